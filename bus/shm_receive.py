"""The receiving side of same-host shared memory (``dpipes.bus.shm``): senders' segments mapped
read-only, zero-copy views handed out over them, and the leases read told back to their senders in
batches.

A receiver (a hub, or a client of one) maps a sender's segment the first time a handle names it,
after checking that the handle names a dpipes memfd of that process, and keeps it mapped (at most
``MAX_MAPPED_SEGMENTS``) until the sender is gone. Each ``SHM`` message gets views of its frames,
which must lie inside the segment; when the reader has dropped every view of a message, its lease
goes back to the sender in the next ``SHM_FREE`` (one per ``FREE_BATCH_LEASES`` leases or
``FREE_BATCH_BYTES`` of their payload, or ``FREE_DELAY_S`` after the first).

A hub keeps a departed client's segments mapped a while longer (*parked*), as long as that
client's process still holds them: the process's next client takes them back from its stash
(``dpipes.bus.shm``, *Segments outlive their pool*) and names the same segments, which a parked
mapping serves with its page tables already filled in. A segment mapped anew costs a page fault at
the first touch of each 64 KiB of it (3-7 us here): a fresh client's first hundred 640 KB Arrow
batches, each read in full, took 117 us of its hub's CPU apiece, 58 in a parked mapping. Mapping
with ``MAP_POPULATE`` instead costs as much per page (0.65 ms per 8 MiB segment), and far more for
a reader that touches only a batch's metadata (119 us per batch, not 69).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
import weakref
from collections.abc import Callable, Sequence

from dpipes.bus.errors import DecodeError

MAX_MAPPED_SEGMENTS = 256  # segments a receiver keeps mapped per sender process, at most
MAX_HANDLE_CHARS = 128
# A departed sender's parked segments are looked at this often, and unmapped when their process no
# longer holds them (gone, or it gave them back to the kernel): memory its process gave up stays
# pinned here this long at most. Parked longer than PARKED_MAX_S, they go anyway, so that
# a hub whose clients stopped coming wakes up for them no longer.
PARKED_CHECK_S = 1.0
PARKED_MAX_S = 60.0
# A receiver tells a sender of the leases it has done with in one SHM_FREE per this many, or this
# late at most: a stream of 10k-row Arrow batches sent one SHM_FREE back per batch.
FREE_BATCH_LEASES = 32
FREE_DELAY_S = 0.002
# ...or once this much payload waits: a sender's pool reuses the space it gets back first, so what
# circulates between the two (credit in flight, plus this) can stay in the CPU's last-level cache
# (32 leases of 1 MiB were 40 MiB; the L3 here has 32). Not much less: each SHM_FREE is a send
# that wakes both sides' I/O threads, and at 2 MiB 1 MiB messages went 25% slower than at 8.
FREE_BATCH_BYTES = 8 << 20


def call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
    """Run ``callback`` on ``loop`` soon, from any thread (a finalizer may run in any); False when closed."""
    try:
        if asyncio.get_running_loop() is loop:  # the usual case: no wake-up through the self-pipe
            loop.call_soon(callback)
            return True
    except RuntimeError:
        pass
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        return False
    return True


def call_later(loop: asyncio.AbstractEventLoop, delay: float, callback: Callable[[], None]) -> bool:
    """Run ``callback`` on ``loop`` in ``delay`` seconds, from any thread; False when closed."""

    def arm() -> None:
        loop.call_later(delay, callback)

    try:
        if asyncio.get_running_loop() is loop:
            arm()
            return True
    except RuntimeError:
        pass
    return call_soon(loop, arm)


class Frees:
    """Leases a receiver has done with, told to their senders in batches (``FREE_BATCH_LEASES``,
    ``FREE_BATCH_BYTES``, ``FREE_DELAY_S``) by ``send``, called with ``{sender: [lease, ...]}`` on
    the loop's thread."""

    def __init__(self, send: Callable[[dict[str, list[int]]], None]) -> None:
        self._send = send
        self._leases: dict[str, list[int]] = {}
        self._count = 0
        self._bytes = 0
        self._scheduled = False  # a timer armed for a flush FREE_DELAY_S after a lease was added
        self._due = False  # a flush this loop pass
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, sender: str, lease: int, nbytes: int = 0) -> None:
        """Lease ``lease`` of ``sender``, of ``nbytes`` payload bytes, is done with (from any thread:
        a finalizer may run in any)."""
        self._leases.setdefault(sender, []).append(lease)
        self._count += 1
        self._bytes += nbytes
        loop = self.loop
        if loop is None:
            return
        if self._count >= FREE_BATCH_LEASES or self._bytes >= FREE_BATCH_BYTES:
            if not self._due:
                self._due = call_soon(loop, self.flush)
                if not self._due:
                    self.clear()
        elif not self._scheduled:
            self._scheduled = call_later(loop, FREE_DELAY_S, self._flush_late)
            if not self._scheduled:  # the loop is closed: nobody is left to tell
                self.clear()

    def _flush_late(self) -> None:
        # Only the timer disarms itself: a batch sent earlier leaves it armed, so that a stream of
        # batches (each sent in its pass) arms one timer per FREE_DELAY_S, not one per batch that
        # wakes an idle loop for nothing (each 8 MiB of 1 MiB leases did). What is added meanwhile
        # goes when it fires, sooner than FREE_DELAY_S after.
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Send what is waiting now."""
        self._due = False
        leases, self._leases, self._count, self._bytes = self._leases, {}, 0, 0
        if leases:
            self._send(leases)

    def clear(self) -> None:
        """Forget what is waiting (its senders are gone, or so are we)."""
        self._leases, self._count, self._bytes = {}, 0, 0


class _Mapped:
    """A segment of another process, mapped read-only here."""

    __slots__ = ("address", "buffer", "file", "live", "map", "sender", "size")

    def __init__(self, mapped: mmap.mmap, size: int, sender: str, file: tuple[int, int]) -> None:
        import pyarrow as pa  # only a receiver of handles pays for it

        self.map = mapped
        self.size = size
        self.sender = sender
        self.file = file  # the memfd's (st_dev, st_ino): which file a handle naming it must still be
        self.live = 0  # leases with views still held
        self.buffer = pa.py_buffer(mapped)  # exports the map: it stays mapped while this lives
        self.address: int = self.buffer.address


class _Held:
    """One received message's payload: its views keep it alive; when they are gone, it is given back."""

    __slots__ = ("__weakref__", "segment")

    def __init__(self, segment: _Mapped) -> None:
        self.segment = segment


class _Watch(weakref.ref):
    """Tells the reader when a ``_Held`` is gone: a bare weak reference with the lease it stands for
    (a third of ``weakref.finalize``'s cost, paid once per message)."""

    __slots__ = ("lease", "nbytes", "segment", "sender")
    lease: int
    nbytes: int
    segment: _Mapped
    sender: str


class Reader:
    """A receiver's mappings of senders' segments, and the views it hands out over them.

    Args:
        release: called with (the sender's address, the lease id, its payload bytes) once the reader
            has dropped every view of that lease; it must only queue the release (it may run inside
            a garbage collection).
    """

    def __init__(self, release: Callable[[str, int, int], None]) -> None:
        self._release = release
        self._mapped: dict[str, _Mapped] = {}
        self._parked: dict[str, tuple[_Mapped, float]] = {}  # departed senders' segments, since when
        self._check: asyncio.TimerHandle | None = None  # the next look at the parked ones
        self._watches: set[_Watch] = set()  # one per message whose views are still held
        self.mapped_bytes = 0  # of every segment mapped here, parked ones included
        self.maps = 0  # segments mapped (a parked one named again is not mapped anew)

    def views(
        self, sender: str, handle: str, lease_id: int, sizes: Sequence[int], offset: int = 0
    ) -> tuple[memoryview, ...]:
        """Zero-copy views of one lease's payload frames: ``sizes`` bytes each, end to end from
        ``offset`` bytes into the segment.

        Raises:
            DecodeError: the handle is malformed or names no segment of that process, or the
                frames do not lie inside it.
        """
        import pyarrow as pa

        segment = self._mapped.get(handle) or self._map(handle, sender)
        end = offset + sum(sizes)
        if type(offset) is not int or offset < 0 or end > segment.size:
            raise DecodeError(
                f"SHM frames of {end - offset} bytes at offset {offset!r:.20} do not lie inside the "
                f"{segment.size}-byte segment {handle!r:.80}"
            )
        held = _Held(segment)
        segment.live += 1
        watch = _Watch(held, self._done)
        watch.segment, watch.sender, watch.lease, watch.nbytes = segment, sender, lease_id, end - offset
        self._watches.add(watch)  # a weak reference must itself live until its callback
        out = []
        at = segment.address + offset
        for size in sizes:
            out.append(memoryview(pa.foreign_buffer(at, size, base=held)).cast("B"))
            at += size
        return tuple(out)

    def _done(self, watch: _Watch) -> None:
        self._watches.discard(watch)
        watch.segment.live -= 1
        self._release(watch.sender, watch.lease, watch.nbytes)

    def _map(self, handle: str, sender: str) -> _Mapped:
        pid, fd, token, size = _parse_handle(handle)
        path = f"/proc/{pid}/fd/{fd}"
        parked = self._parked.pop(handle, None)
        if parked is not None:
            segment = parked[0]
            if _held_by_sender(handle, segment):  # the very file checked when it was mapped
                segment.sender = sender
                self._mapped[handle] = segment
                return segment
            self.mapped_bytes -= segment.size  # the handle names another file now: checked anew
        expected = f"/memfd:dpipes-{token} (deleted)"
        try:
            if os.readlink(path) != expected:
                raise DecodeError(f"SHM handle {handle!r:.80} names no dpipes segment of process {pid}")
            local = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DecodeError(f"SHM handle {handle!r:.80}: cannot open the segment: {exc.strerror}") from None
        try:
            if os.readlink(f"/proc/self/fd/{local}") != expected:  # the sender's fd changed meanwhile
                raise DecodeError(f"SHM handle {handle!r:.80}: the segment went away")
            stat = os.fstat(local)
            if stat.st_size < size:
                raise DecodeError(f"SHM handle {handle!r:.80}: the segment is smaller than it says")
            mapped = mmap.mmap(local, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as exc:
            raise DecodeError(f"SHM handle {handle!r:.80}: cannot map the segment: {exc.strerror}") from None
        finally:
            os.close(local)
        if len(self._mapped) + len(self._parked) >= MAX_MAPPED_SEGMENTS:
            self.forget_unused()
        segment = self._mapped[handle] = _Mapped(mapped, size, sender, (stat.st_dev, stat.st_ino))
        self.mapped_bytes += size
        self.maps += 1
        return segment

    def forget(self, sender: str) -> None:
        """Party ``sender`` is gone: its segments are parked while its process holds them, looked at
        every ``PARKED_CHECK_S`` on the running loop (without one, they are unmapped now). Views
        still held keep theirs mapped until they are dropped; then the memory is freed."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        now = time.monotonic()
        for handle in [h for h, m in self._mapped.items() if m.sender == sender]:
            segment = self._mapped.pop(handle)
            if loop is None:
                self.mapped_bytes -= segment.size
            else:
                self._parked[handle] = (segment, now)
        if self._parked and self._check is None and loop is not None:
            self._check = loop.call_later(PARKED_CHECK_S, self._check_parked)

    def _check_parked(self) -> None:
        self._check = None
        oldest = time.monotonic() - PARKED_MAX_S
        for handle, (segment, since) in list(self._parked.items()):
            if since < oldest or not _held_by_sender(handle, segment):
                del self._parked[handle]
                self.mapped_bytes -= segment.size
        if self._parked:
            self._check = asyncio.get_running_loop().call_later(PARKED_CHECK_S, self._check_parked)

    def forget_unused(self) -> None:
        """Unmap every segment no view refers to, parked ones first (they are mapped again when a
        handle names them)."""
        self._unpark()
        for handle, segment in list(self._mapped.items()):
            if not segment.live:
                self.mapped_bytes -= self._mapped.pop(handle).size

    def _unpark(self) -> None:
        self.mapped_bytes -= sum(segment.size for segment, _ in self._parked.values())
        self._parked.clear()
        if self._check is not None:
            self._check.cancel()
            self._check = None

    def close(self) -> None:
        """Drop every mapping this reader keeps; views still held keep theirs alive."""
        self._unpark()
        self._mapped.clear()
        self.mapped_bytes = 0


def _held_by_sender(handle: str, segment: _Mapped) -> bool:
    """Whether the descriptor ``handle`` names is still the file ``segment`` maps."""
    pid, fd, _token, _size = _parse_handle(handle)
    try:
        stat = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:  # the process is gone, or closed it
        return False
    return (stat.st_dev, stat.st_ino) == segment.file


def _parse_handle(handle: str) -> tuple[int, int, str, int]:
    parts = handle.split(":") if len(handle) <= MAX_HANDLE_CHARS else []
    if len(parts) != 4 or not all(p.isdigit() for p in (parts[0], parts[1], parts[3])):
        raise DecodeError(f"SHM handle {handle!r:.80} is not PID:FD:TOKEN:SIZE")
    if not (parts[2].isalnum() and parts[2].isascii()):
        raise DecodeError(f"SHM handle {handle!r:.80}: the token is not alphanumeric")
    return int(parts[0]), int(parts[1]), parts[2], int(parts[3])
