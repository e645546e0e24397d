"""Peak memory of a block of code: CUDA's allocator statistics, or the process's resident
set size sampled by a thread (the benchmarks of sampling and of training share it)."""

from __future__ import annotations

import os
import sys
import threading

import torch


class PeakMemory:
    """Context manager: `peak` is the most memory in use while its block ran, in bytes,
    and `start` the memory in use when it began.

    CUDA: torch's max allocated. Otherwise the process's resident set size, read by a
    thread every few milliseconds (no dependency needed on Linux)."""

    INTERVAL_S = 0.002

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        release_free_memory()
        self.peak = self.start = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.INTERVAL_S):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        return False


def rss_bytes() -> int:
    """The process's resident set size now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        # No /proc (macOS): the lifetime peak is the best the standard library offers.
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def release_free_memory() -> None:
    """Give freed memory back to the OS before a CPU measurement: glibc keeps freed heap
    pages mapped, and each method's RSS peak would otherwise include earlier methods'.
    (No gc.collect(): tensors are freed by reference counting, and a full collection
    costs half a second with diffusers and transformers loaded.)"""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may then overstate a method's own peak
