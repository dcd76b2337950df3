"""What ``send_frames`` does with a frame: copied up to ``COPY_UP_TO_BYTES``, shared above; and
that a ``Pump`` handles a message whose FD edge its own send consumed.

A sender that is still connecting holds its messages in ZeroMQ's queue: what the sender's buffer
holds when its peer finally reads shows whether the message was copied at the send or shares the
buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import zmq

from dpipes.bus.pump import COPY_UP_TO_BYTES, Pump, send_frames

WAIT_MS = 10_000
WAIT_S = WAIT_MS / 1000
# libzmq looks at a socket's commands on a send at most once per max_command_delay (about a
# millisecond of CPU ticks); after this long without one, a send does look, and so consumes the
# FD's edge of a message that arrived before it.
COMMAND_THROTTLE_S = 0.005


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


async def test_a_message_that_arrives_before_our_send_is_handled_though_the_send_took_its_edge() -> None:
    ctx = zmq.Context()
    peer, sock = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for each in (peer, sock):
        each.linger = 0
    peer.rcvtimeo = WAIT_MS
    got: asyncio.Queue[bytes] = asyncio.Queue()
    try:
        with tempfile.TemporaryDirectory(prefix="dpipes-pump-") as tmp:
            peer.bind(f"ipc://{tmp}/s")
            sock.connect(f"ipc://{tmp}/s")
            pump = Pump(sock, lambda frames: got.put_nowait(frames[0].bytes))
            pump.send([b"hello"])
            ident, _ = peer.recv_multipart()
            peer.send_multipart([ident, b"ready"])  # once drained, the socket signals its FD for the next one
            assert await asyncio.wait_for(got.get(), WAIT_S) == b"ready"
            fd: Any = sock.getsockopt(zmq.FD)
            for n in range(3):
                peer.send_multipart([ident, b"to us %d" % n])
                # The loop does not run until the send below is done: the message is there, its
                # edge on the FD too, when we send.
                readable, _, _ = select.select([fd], [], [], WAIT_S)
                assert readable, "the message never reached the socket"
                time.sleep(COMMAND_THROTTLE_S)  # noqa: ASYNC251 - the loop must not run meanwhile
                pump.send([b"from us %d" % n])
                assert await asyncio.wait_for(got.get(), WAIT_S) == b"to us %d" % n
                assert peer.recv_multipart()[1] == b"from us %d" % n
    finally:
        if "pump" in locals():
            pump.close()
        sock.close(0)
        peer.close(0)
        ctx.term()


async def test_a_routed_pump_hands_over_the_routing_id_as_bytes_and_every_frame_after_it() -> None:
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for each in (router, dealer):
        each.linger = 0
    dealer.setsockopt(zmq.ROUTING_ID, b"peer-1")
    got: asyncio.Queue[list[Any]] = asyncio.Queue()
    try:
        with tempfile.TemporaryDirectory(prefix="dpipes-pump-") as tmp:
            router.bind(f"ipc://{tmp}/s")
            dealer.connect(f"ipc://{tmp}/s")
            pump = Pump(router, got.put_nowait, routed=True)
            dealer.send_multipart([b"header", b"one", b"two"])
            dealer.send(b"alone")
            first = await asyncio.wait_for(got.get(), WAIT_S)
            assert first[0] == b"peer-1" and type(first[0]) is bytes
            assert [f.bytes for f in first[1:]] == [b"header", b"one", b"two"]
            second = await asyncio.wait_for(got.get(), WAIT_S)
            assert second[0] == b"peer-1" and [f.bytes for f in second[1:]] == [b"alone"]
    finally:
        if "pump" in locals():
            pump.close()
        router.close(0)
        dealer.close(0)
        ctx.term()
