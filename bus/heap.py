"""Keep the C heap from handing back, then faulting in again, the memory of large received messages.

libzmq allocates each received message with ``malloc`` in its I/O thread; the reader frees it later
from the loop's thread. With glibc's defaults, a few freed 1 MiB messages leave the top of that
arena free past the trim threshold, glibc gives those pages back to the kernel, and the next
messages fault them in again, zeroed by the kernel: measured, a fifth of a hub's CPU when it
receives 1 MiB messages over TCP (page faults, ``clear_page``, unmapping). A hub therefore asks
glibc, once per process, to serve messages up to 32 MiB (the most it allows) from its arenas and
to keep up to ``TRIM_THRESHOLD_BYTES`` free at an arena's top. What a process keeps is bounded by
that and by what its hub holds anyway (credit windows, ``MAX_HELD_BYTES``). Elsewhere than glibc
this does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt(3) parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest; bigger messages are mapped and unmapped each
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024  # free memory an arena keeps at its top: a credit window's worth

_done = False


def keep_message_memory() -> bool:
    """Set glibc's thresholds for this process (once); False where there is no glibc ``mallopt``."""
    global _done
    if _done:
        return True
    try:
        # The symbols already loaded into this process, libc's among them: ctypes.util.find_library
        # would run /sbin/ldconfig -p in a child process (~10 ms of a daemon's start, for a name).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either one turns glibc's own adjustment of both off: both are set, mmap's first.
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not ok:
        log.debug("mallopt refused the message heap thresholds; the C heap keeps its defaults")
    _done = ok
    return ok
