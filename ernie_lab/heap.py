"""Handing freed memory back to the operating system while a big model is built tensor by tensor.

Loading with quantize-on-read (and ``quant.quantize`` on a loaded model) repeats one pattern thousands of
times: read a float weight, make its small codes, free the float weight and the temporaries. The codes
live on; the temporaries die at once. glibc's ``malloc`` serves blocks below its mmap threshold from its
heap, and that threshold *grows* to the size of the largest block freed so far (up to 32 MiB). After the
first few weights, every temporary of a 21B-A3B expert (7.5 MiB in bf16, 15 MiB in fp32) comes from the
heap, and the long-lived codes land between them. The freed temporaries leave holes the heap cannot
return, and which later blocks of other sizes do not always fill.

Measured on a 6-layer cut of the 21B-A3B (2.5 GiB of w4a16 weights, each load in a fresh process;
``benchmarks/big_moe.py --part heap`` repeats it): the anonymous memory peaked at 3.1 or 8.0 GiB from run
to run without trims, the same file and the same code, and at 2.81-2.85 GiB in every run with them. That is
why one of two whole 21B-A3B loads was killed out of memory at 57% of its tensors on a 24 GB machine, and
the VL-28B-A3B at 53% holding 23.7 GB; with the trims they peak at 11.6 and 15.5 GiB.

``malloc_trim(0)`` gives the holes' pages back (glibc returns the whole free pages inside its heaps, not
only the top). A call costs about 0.5 ms while the heap is small and 1.5-3.5 ms beside a resident bf16
model, so the loader and ``quantize`` call it through a :class:`Trimmer`, once per 64 MiB of weights converted.

Elsewhere (macOS, musl, Windows) this is a no-op: their allocators return large blocks by themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def available() -> bool:
    """True where freed memory can be handed back explicitly (glibc)."""
    return _malloc_trim() is not None


def release_freed_memory() -> bool:
    """Return the free pages of the C heap to the operating system; True if any went back."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


class Trimmer:
    """Calls :func:`release_freed_memory` once each time ``every`` more bytes have been converted."""

    def __init__(self, every: int = 64 * 2**20):
        self.every, self.pending = every, 0

    def converted(self, nbytes: int) -> None:
        """Note ``nbytes`` of weights converted (their temporaries freed); trim when enough have piled up."""
        self.pending += nbytes
        if self.pending >= self.every:
            self.pending = 0
            release_freed_memory()

    def finish(self) -> None:
        """The last trim, for whatever is still pending."""
        if self.pending:
            self.pending = 0
            release_freed_memory()
