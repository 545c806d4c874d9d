"""``qwen-image-adapter``: serve the OpenAI Images API with uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from openai_adapter.app import create_app

# The most bytes of a request's line and headers (nginx's 4 buffers of 8 KiB): uvicorn's
# default parser (httptools) keeps headers without limit, so a client could send one
# connection's headers until the pod runs out of memory, before any authentication. Larger
# ones get a 400 and their connection is closed.
MAX_HEADER_BYTES = 32 * 1024


def configure_logging(level: str) -> None:
    """Log at ``level``; httpx's line for each call only at debug level, as it names the
    whole URL, and an edit's image URL may carry credentials (a presigned URL's signature).
    The adapter logs its own line for each predictor call, with the request id."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until stopped (configuration: QWEN_ADAPTER_* env)."""
    parser = argparse.ArgumentParser(
        prog="qwen-image-adapter",
        description="OpenAI Images API in front of the Qwen-Image KServe predictors. "
        "Configure it with QWEN_ADAPTER_* environment variables.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=65,
        help="seconds an idle client connection stays open (longer than a proxy's idle timeout)",
    )
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_keep_alive=args.timeout_keep_alive,
        http="h11",
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


if __name__ == "__main__":
    main()
