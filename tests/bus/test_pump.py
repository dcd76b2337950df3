"""What ``send_frames`` does with a frame: copied up to ``COPY_UP_TO_BYTES``, shared above.

A sender that is still connecting holds its messages in ZeroMQ's queue: what the sender's buffer
holds when its peer finally reads shows whether the message was copied at the send or shares the
buffer.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import zmq

from dpipes.bus.pump import COPY_UP_TO_BYTES, send_frames

WAIT_MS = 10_000


@contextlib.contextmanager
def queued_pair() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes], str]]:
    """A DEALER connected to an ipc:// path nobody has bound yet (its sends wait in its queue),
    a ROUTER to bind there later, and the path."""
    ctx = zmq.Context()
    sender, receiver = ctx.socket(zmq.DEALER), ctx.socket(zmq.ROUTER)
    for sock in (sender, receiver):
        sock.linger = 0
        sock.rcvtimeo = sock.sndtimeo = WAIT_MS
    with tempfile.TemporaryDirectory(prefix="dpipes-pump-") as tmp:  # short: an ipc:// path has a limit
        path = f"ipc://{tmp}/s"
        sender.connect(path)
        try:
            yield sender, receiver, path
        finally:
            sender.close(0)
            receiver.close(0)
            ctx.term()


def test_a_frame_up_to_the_bar_is_copied_at_the_send_so_its_buffer_is_free_at_once() -> None:
    with queued_pair() as (sender, receiver, path):
        data = bytearray(b"a" * COPY_UP_TO_BYTES)
        send_frames(sender, [b"head", data])
        data[:] = b"b" * len(data)  # a reused read buffer, refilled while the message still waits
        receiver.bind(path)
        _ident, head, body = receiver.recv_multipart()
    assert head == b"head"
    assert body == b"a" * COPY_UP_TO_BYTES


def test_a_larger_frame_is_shared_with_zeromq_until_it_is_sent() -> None:
    with queued_pair() as (sender, receiver, path):
        data = bytearray(b"c" * (COPY_UP_TO_BYTES + 1))
        send_frames(sender, [b"head", data])
        data[:] = b"d" * len(data)  # what its owner must not do: the message reads the buffer when it leaves
        receiver.bind(path)
        _ident, _head, body = receiver.recv_multipart()
    assert body == b"d" * (COPY_UP_TO_BYTES + 1), "the large frame was copied: it should go zero-copy"
