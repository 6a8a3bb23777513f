"""Give freed heap memory back to the operating system (glibc only).

A relay allocates and frees many buffers of 16-64 KiB while data flows.  glibc
keeps freed memory inside the process (the heap top only shrinks when its last
chunk is free, and its mmap threshold rises after large frees), so after a burst
of bulk transfer a process stays 20-30 MiB above its idle size for ever.
``malloc_trim(0)`` releases every free page, not only the heap top.  The
trimmer checks, every few seconds, how much freed memory glibc holds
(``mallinfo2``, ~20 µs) and trims when that exceeds a threshold: one trim per
interval at most, ~2 ms for a heap holding 20 MiB of freed memory and ~0.2 ms
when it was trimmed before (so a low threshold costs nothing worth counting).

On other C libraries (musl, macOS) nothing is loaded and the service does
nothing.
"""

from __future__ import annotations

import ctypes
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.task import LoopingCall

DEFAULT_INTERVAL = 5.0
DEFAULT_THRESHOLD = 256 * 1024


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33 and later): every field is a size_t."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


class Allocator(Protocol):
    """What the trimmer needs from the C allocator."""

    def free_bytes(self) -> int:
        """Bytes the allocator holds that are free (may be an estimate)."""

    def trim(self) -> bool:
        """Return free memory to the OS; True when some was released."""


class GlibcAllocator:
    """glibc's ``mallinfo2`` and ``malloc_trim`` through ctypes."""

    def __init__(self, libc: Any) -> None:
        self._trim = libc.malloc_trim
        self._trim.argtypes = [ctypes.c_size_t]
        self._trim.restype = ctypes.c_int
        self._info = getattr(libc, "mallinfo2", None)
        if self._info is not None:
            self._info.argtypes = []
            self._info.restype = _MallInfo2

    def free_bytes(self) -> int:
        """Freed memory held in the heap (all of it when ``mallinfo2`` is missing)."""
        if self._info is None:
            return DEFAULT_THRESHOLD  # glibc before 2.33: trim every interval
        return int(self._info().fordblks)

    def trim(self) -> bool:
        """``malloc_trim(0)``."""
        return bool(self._trim(0))


def glibc_allocator() -> GlibcAllocator | None:
    """The running glibc's allocator, or None on another C library."""
    try:
        # The symbols already loaded into this process, libc's among them (no
        # ctypes.util.find_library: it runs ldconfig in a subprocess).
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        return GlibcAllocator(libc)
    except (OSError, AttributeError):
        return None


class HeapTrimmer(service.Service):
    """Every ``interval`` seconds, trim the heap if it holds ``threshold`` free bytes."""

    def __init__(self, clock: Any, allocator: Allocator | None,
                 interval: float = DEFAULT_INTERVAL,
                 threshold: int = DEFAULT_THRESHOLD) -> None:
        self.allocator = allocator
        self.interval = interval
        self.threshold = threshold
        self.trims = 0
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def check(self) -> None:
        """Trim when enough freed memory has gathered."""
        if self.allocator is None or self.allocator.free_bytes() < self.threshold:
            return
        self.allocator.trim()
        self.trims += 1

    def startService(self) -> None:  # noqa: N802
        """Start checking; the first check, at once, returns start-up's garbage."""
        super().startService()
        if self.allocator is not None:
            self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:  # noqa: N802
        """Stop checking."""
        if self._loop.running:
            self._loop.stop()
        return super().stopService()
