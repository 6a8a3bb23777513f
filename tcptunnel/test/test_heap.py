"""The heap trimmer: when it trims, and that glibc's calls work here."""

from __future__ import annotations

import os
import platform

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel.heap import HeapTrimmer, glibc_allocator


class FakeAllocator:
    """An allocator whose free memory the test sets; counts trims."""

    def __init__(self) -> None:
        self.free = 0
        self.trims = 0

    def free_bytes(self) -> int:
        return self.free

    def trim(self) -> bool:
        self.trims += 1
        self.free = 0
        return True


class HeapTrimmerTests(SynchronousTestCase):
    """Trim only when enough freed memory is held, at most once per interval."""

    def test_trims_only_above_threshold(self) -> None:
        """A check below the threshold does nothing; above it, one trim."""
        clock, allocator = Clock(), FakeAllocator()
        trimmer = HeapTrimmer(clock, allocator, interval=5.0, threshold=1000)
        allocator.free = 999
        trimmer.startService()
        self.assertEqual(allocator.trims, 0)
        allocator.free = 1000
        clock.advance(4.9)
        self.assertEqual(allocator.trims, 0, "no check before the interval ends")
        clock.advance(0.1)
        self.assertEqual((allocator.trims, trimmer.trims), (1, 1))
        clock.advance(5.0)
        self.assertEqual(allocator.trims, 1, "nothing freed since: no second trim")
        trimmer.stopService()
        allocator.free = 5000
        clock.advance(50.0)
        self.assertEqual(allocator.trims, 1, "a stopped trimmer never trims")

    def test_first_check_at_start(self) -> None:
        """Start-up's garbage is returned at once, not one interval later."""
        clock, allocator = Clock(), FakeAllocator()
        allocator.free = 10_000
        trimmer = HeapTrimmer(clock, allocator, threshold=1000)
        trimmer.startService()
        self.assertEqual(allocator.trims, 1)
        trimmer.stopService()

    def test_without_allocator(self) -> None:
        """On a C library other than glibc the service starts, stops and schedules nothing."""
        clock = Clock()
        trimmer = HeapTrimmer(clock, None)
        trimmer.startService()
        self.assertEqual(clock.getDelayedCalls(), [])
        trimmer.stopService()


class GlibcTests(SynchronousTestCase):
    """The ctypes bindings against the real C library of this machine."""

    def setUp(self) -> None:
        if platform.libc_ver()[0] != "glibc":
            raise self.skipTest("needs glibc; elsewhere glibc_allocator() is None")

    def test_free_bytes_grow_after_freeing(self) -> None:
        """mallinfo2 sees memory freed by Python, and malloc_trim gives it back."""
        allocator = glibc_allocator()
        assert allocator is not None
        # Many medium objects (glibc's heap, not Python's small-object arenas or mmap).
        blocks = [bytearray(64 * 1024) for _ in range(256)]
        before = allocator.free_bytes()
        del blocks[::2]  # every other block: the heap cannot shrink from the top alone
        freed = allocator.free_bytes()
        self.assertGreater(freed - before, 4 * 1024 * 1024)
        resident = _resident_bytes()
        allocator.trim()
        self.assertGreater(resident - _resident_bytes(), 4 * 1024 * 1024,
                           "malloc_trim returned the freed pages")
        del blocks


def _resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
