"""What only the garbage collector would free: objects kept alive by reference cycles, which
CPython's reference counting cannot free. A request whose data ends in a cycle stays in memory
after its answer until the collector's next full pass (rare under steady load)."""

from __future__ import annotations

import contextlib
import gc
import types
from collections.abc import Iterator


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """Run the block with no automatic collection, after one that starts it clean."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cyclic_garbage() -> list[object]:
    """Collect now, and return what the collection freed (objects in reference cycles)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def frames_holding(garbage: list[object], min_bytes: int) -> list[str]:
    """The names of the frames in ``garbage`` with a local of at least ``min_bytes`` bytes."""
    return [
        frame.f_code.co_name
        for frame in garbage
        if isinstance(frame, types.FrameType)
        and any(
            isinstance(value, bytes | bytearray) and len(value) >= min_bytes
            for value in frame.f_locals.values()
        )
    ]
