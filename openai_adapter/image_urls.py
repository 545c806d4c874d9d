"""The ``image_url`` of a JSON edit's images: a base64 data URL, or an http(s) URL on a host
that the deployment lists, which the adapter then fetches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import httpx

from openai_adapter import metrics
from openai_adapter.media import decode_data_url
from openai_adapter.middleware import hold_upload_bytes
from openai_adapter.settings import Settings

# How a client is told to send its image instead of a URL this deployment does not read.
DATA_URL_HINT = "send the image itself as a base64 data URL ('data:image/png;base64,...')"


class ImageUrlRefused(ValueError):
    """A URL of a kind or host that this deployment does not read."""

    outcome = "refused"  # of an http(s) URL, in ``metrics.IMAGE_URLS``


class ImageUrlUnreadable(ValueError):
    """A URL that does not give an image's bytes: a malformed data URL, a failed fetch."""

    outcome = "failed"


class ImageUrlTimedOut(ImageUrlUnreadable):
    """A fetch that the request's time for its image URLs ran out on."""

    outcome = "timed_out"


def host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether ``host`` (ASCII, as in a URL) is one of ``allowed_hosts`` (lower case, as
    ``Settings`` keeps them), exactly or under a ``*.parent`` entry."""
    host = host.lower()
    return any(
        host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:]))
        for allowed in allowed_hosts
    )


class ImageUrlReader:
    """Reads an image's ``image_url``. A data URL is decoded. An http(s) URL is fetched only
    when its host is in ``Settings.image_url_hosts``, following no redirects, and by a
    deadline: left open, clients could make the adapter reach whatever the cluster can
    reach. The fetches go through the proxy that ``HTTP(S)_PROXY`` names, if any."""

    def __init__(self, settings: Settings):
        self._hosts = settings.image_url_hosts
        self._timeout = settings.image_url_timeout_seconds
        # No timeouts of its own (``read`` bounds a whole fetch) and no pool limit: each edit
        # fetches one image at a time, so the adapter's own requests bound the connections.
        # The environment's proxy settings apply (httpx's trust_env).
        self._http = httpx.AsyncClient(
            timeout=None,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=None),
            headers={"Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        """Close the fetching connections."""
        await self._http.aclose()

    def deadline(self, request_deadline: float) -> float:
        """When the image URLs of a request that starts reading them now must all be
        fetched (event loop time): ``Settings.image_url_timeout_seconds`` bounds them
        together, however many there are, and the request's own deadline too."""
        return min(asyncio.get_running_loop().time() + self._timeout, request_deadline)

    async def read(self, url: str, max_bytes: int, deadline: float) -> bytes:
        """The image's bytes, at most ``max_bytes`` of one fetched by ``deadline``
        (``deadline()``). Raises ImageUrlRefused or ImageUrlUnreadable, whose message
        completes "<the image>'s image_url ..."."""
        scheme = url.partition(":")[0].lower()
        if scheme == "data":
            try:
                return decode_data_url(url)
            except ValueError as problem:
                raise ImageUrlUnreadable(f"{problem}: {DATA_URL_HINT}") from None
        started = asyncio.get_running_loop().time()
        try:
            data = await self._fetch_listed(url, scheme, max_bytes, deadline)
        except (ImageUrlRefused, ImageUrlUnreadable) as problem:
            metrics.IMAGE_URLS.labels(outcome=problem.outcome).inc()
            raise
        metrics.IMAGE_URLS.labels(outcome="fetched").inc()
        metrics.IMAGE_URL_FETCH_SECONDS.observe(asyncio.get_running_loop().time() - started)
        return data

    async def _fetch_listed(self, url: str, scheme: str, max_bytes: int, deadline: float) -> bytes:
        """``read`` for a URL that is not a data URL: fetched if its scheme is http(s) and its
        host is listed."""
        if scheme not in ("http", "https"):
            raise ImageUrlRefused(f"is neither a data URL nor an http(s) URL: {DATA_URL_HINT}")
        if not self._hosts:
            raise ImageUrlRefused(
                f"is not a data URL, and this server fetches no URLs: {DATA_URL_HINT}"
            )
        request = self._request(url)
        host = request.url.raw_host.decode("ascii")
        if not host_allowed(host, self._hosts):
            raise ImageUrlRefused(
                f"is on {host!r}, a host that this server does not fetch images from: "
                f"{DATA_URL_HINT}"
            )
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(self._fetch(request, max_bytes), remaining)
        except TimeoutError:
            raise ImageUrlTimedOut(
                f"could not be fetched within {self._timeout:g} s, the time for all of a "
                "request's image URLs (less if the request's own time ends first)"
            ) from None

    def _request(self, url: str) -> httpx.Request:
        """The GET of an http(s) URL; ImageUrlUnreadable for a URL that no request can be
        made of (its syntax, its host's encoding, a port past 65535)."""
        try:
            request = self._http.build_request("GET", url)
        except (httpx.InvalidURL, UnicodeError) as problem:  # IDNA errors are UnicodeErrors
            raise ImageUrlUnreadable(f"is not a valid URL ({problem})") from None
        port = request.url.port
        if port is not None and not 0 < port < 65536:
            raise ImageUrlUnreadable(f"is not a valid URL (port {port})")
        return request

    async def _fetch(self, request: httpx.Request, max_bytes: int) -> bytes:
        try:
            async with contextlib.aclosing(await self._http.send(request, stream=True)) as response:
                if response.status_code != 200:
                    redirect = " (redirects are not followed)" if response.is_redirect else ""
                    raise ImageUrlUnreadable(
                        f"could not be fetched: HTTP {response.status_code}{redirect}"
                    )
                encoding = response.headers.get("content-encoding", "identity").lower()
                if encoding != "identity":
                    raise ImageUrlUnreadable(
                        f"could not be fetched: the answer is {encoding}-encoded"
                    )
                data = bytearray()
                async for chunk in response.aiter_raw():
                    # Held as it arrives, until the request ends, as an uploaded file is:
                    # fetches under way count against the upload budget too.
                    hold_upload_bytes(len(chunk))
                    data += chunk
                    if len(data) >= max_bytes:
                        break
                del data[max_bytes:]
                return bytes(data)
        except httpx.HTTPError as problem:
            reason = str(problem) or type(problem).__name__
            raise ImageUrlUnreadable(f"could not be fetched: {reason}") from None
