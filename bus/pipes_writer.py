"""A dagster-pipes message writer that sends straight onto the dpipes bus, for high message rates.

In the external program::

    from dagster_pipes import open_dagster_pipes
    from dpipes.bus.pipes_writer import PipesBusMessageWriter

    with open_dagster_pipes(message_writer=PipesBusMessageWriter()) as pipes:
        pipes.log.info("hello")

The offer
    The orchestrator's messages params offer the bus next to a file path::

        {"path": "<fifo>", "dpipes_bus": {"hub": "ipc://...", "to": "<node>/<endpoint>", "stage": 0}}

    ``hub`` is the client endpoint of a dpipes hub, ``to`` the bus address of the reader
    (:class:`dpipes.nodes.pipes.PipesBusReader`), ``stage`` (optional, default 0) goes into every
    ``PIPES`` message. dagster-pipes' own ``PipesDefaultMessageWriter`` ignores the extra key and
    writes to ``path``, so unmodified programs work unchanged. :class:`PipesBusMessageWriter` uses
    the bus when it is offered and its hub answers; otherwise (not offered, or unreachable: said
    once on stderr, naming the hub) it is ``PipesDefaultMessageWriter``.

The channel
    ``write_message`` (from any thread) serialises the message with ``json.dumps`` and queues it. A
    daemon thread runs an asyncio loop with a :class:`~dpipes.bus.client.Client` and one stream to
    ``to``; it is woken only when it may be idle (one wake-up per idle period, not per message) and
    sends what is queued as few ``PIPES`` messages as possible, one JSON message per payload frame,
    at most ``BATCH_MAX_FRAMES`` frames / ``BATCH_MAX_BYTES`` bytes each. The stream is
    credit-flow-controlled, and the queue is bounded (``QUEUE_MAX_MESSAGES``, ``QUEUE_MAX_BYTES``):
    past it, ``write_message`` blocks until the thread has sent some. Nothing is dropped.

    Closing the channel (the end of ``open_dagster_pipes``) sends what is queued, closes the stream
    and waits, at most ``CLOSE_ACK_TIMEOUT_S``, for the reader's acknowledgement of every byte, then
    joins the thread. A process that opens Pipes and exits without closing still delivers what it
    wrote: an ``atexit`` hook does the same. A process that ends by ``os._exit``, a fatal signal or
    ``SIGKILL`` loses what was still queued or in flight.

    If the bus fails mid-run (the reader's endpoint is gone, the hub is gone, the reader cancelled
    the stream), the messages not yet handed to the bus are appended to ``path`` (as dagster-pipes'
    file channel would write them) and every later message goes there too, said once on stderr.
    Messages already sent that the bus bounces (the hub says which: ``OutStream.failed_seq``) go
    there as well; the channel keeps the last ``RETAIN_BYTES`` of sent messages for that, a
    reader's default credit window. When the failure does not say which messages arrived (a
    cancelled stream, a lost hub, no acknowledgement at close), the last ones sent may be lost,
    and the notice says so. A message
    larger than ``MAX_LINE_BYTES`` is sent as it is (up to the bus frame limit; beyond that, its
    first ``codec.MAX_PAYLOAD_FRAME_BYTES`` bytes): the reader reports it as a bad message, the
    program goes on.

The notices go to the program's stderr, not to ``logging``: they are for the person running the
program, and an external program seldom configures logging.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Final

import zmq
from dagster_pipes import (
    PipesDefaultLogWriter,
    PipesDefaultMessageWriter,
    PipesLogWriter,
    PipesMessageWriter,
    PipesMessageWriterChannel,
    PipesParams,
)

from dpipes.bus import codec
from dpipes.bus.client import Client
from dpipes.bus.endpoint import OutStream
from dpipes.bus.errors import BusError
from dpipes.bus.pipes import BUS_OFFER_KEY, MAX_LINE_BYTES

__all__ = [
    "ATTACH_TIMEOUT_S",
    "BUS_OFFER_KEY",
    "CLOSE_ACK_TIMEOUT_S",
    "PipesBusMessageWriter",
    "PipesBusMessageWriterChannel",
    "PipesBusUnavailable",
]

ATTACH_TIMEOUT_S: Final = 2.0  # the offered hub is local (ipc://) and answers in milliseconds
CLOSE_ACK_TIMEOUT_S: Final = 10.0  # at close, wait this long for the reader to acknowledge every byte
BATCH_MAX_FRAMES: Final = 512  # Pipes messages per PIPES bus message
BATCH_MAX_BYTES: Final = 256 * 1024  # ...and their bytes (a bigger message travels alone)
QUEUE_MAX_MESSAGES: Final = 16 * 1024  # queued and not yet sent, before write_message blocks
QUEUE_MAX_BYTES: Final = 32 * 1024 * 1024
RETAIN_BYTES: Final = codec.INITIAL_CREDIT_BYTES  # sent messages kept: a reader's window may still hold them
FALLBACK_KEY: Final = PipesDefaultMessageWriter.FILE_PATH_KEY
_NOTICE_PREFIX: Final = "dpipes: "


class PipesBusUnavailable(BusError, ConnectionError):
    """The offered hub did not answer, or the offer is malformed."""


def _notice(text: str) -> None:
    with contextlib.suppress(Exception):  # a closed or broken stderr must not break the program
        sys.stderr.write(_NOTICE_PREFIX + text + "\n")
        sys.stderr.flush()


def _parse_offer(offer: Any) -> tuple[str, str, int]:
    if not isinstance(offer, Mapping):
        raise PipesBusUnavailable(f"the {BUS_OFFER_KEY!r} offer is not an object: {offer!r:.200}")
    hub, to, stage = offer.get("hub"), offer.get("to"), offer.get("stage", 0)
    if not isinstance(hub, str) or not hub.startswith(("ipc://", "tcp://")):
        raise PipesBusUnavailable(f"the {BUS_OFFER_KEY!r} offer has no ipc:// or tcp:// 'hub': {hub!r:.200}")
    if not isinstance(to, str) or "/" not in to:
        raise PipesBusUnavailable(f"the {BUS_OFFER_KEY!r} offer has no 'to' bus address: {to!r:.200}")
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise PipesBusUnavailable(f"the {BUS_OFFER_KEY!r} offer's 'stage' is not an integer: {stage!r:.200}")
    return hub, to, stage


class PipesBusMessageWriter(PipesMessageWriter[PipesMessageWriterChannel]):
    """Writes Pipes messages onto the dpipes bus when offered, else as ``PipesDefaultMessageWriter``.

    Args:
        attach_timeout_s: how long to wait for the offered hub to answer before falling back.
        close_timeout_s: at close, how long to wait for the reader's acknowledgement.
    """

    def __init__(
        self, *, attach_timeout_s: float = ATTACH_TIMEOUT_S, close_timeout_s: float = CLOSE_ACK_TIMEOUT_S
    ) -> None:
        self._attach_timeout_s = attach_timeout_s
        self._close_timeout_s = close_timeout_s

    @contextlib.contextmanager
    def open(self, params: PipesParams) -> Iterator[PipesMessageWriterChannel]:
        channel = self._connect(params)
        if channel is None:
            with PipesDefaultMessageWriter().open(params) as fallback:
                yield fallback
            return
        try:
            if params.get(PipesDefaultMessageWriter.INCLUDE_STDIO_IN_MESSAGES_KEY):
                capture = PipesDefaultLogWriter(message_channel=channel)
                with capture.open(params.get(PipesLogWriter.LOG_WRITER_KEY, {})):
                    yield channel
            else:
                yield channel
        finally:
            channel.close()

    def _connect(self, params: PipesParams) -> PipesBusMessageWriterChannel | None:
        offer = params.get(BUS_OFFER_KEY)
        if offer is None:
            return None
        path = params.get(FALLBACK_KEY)
        instead = f"writing Pipes messages to {path} instead" if isinstance(path, str) else "no file to write to"
        try:
            hub, to, stage = _parse_offer(offer)
        except PipesBusUnavailable as e:
            _notice(f"{e}; {instead}")
            return None
        channel = PipesBusMessageWriterChannel(
            hub,
            to,
            stage=stage,
            fallback_path=path if isinstance(path, str) else None,
            close_timeout_s=self._close_timeout_s,
        )
        try:
            channel.start(attach_timeout_s=self._attach_timeout_s)
        except PipesBusUnavailable as e:
            _notice(f"{e}; {instead}")
            return None
        return channel


class PipesBusMessageWriterChannel(PipesMessageWriterChannel):
    """Sends each message as one payload frame of a ``PIPES`` bus message on a stream to ``to``.

    Args:
        hub: the client endpoint of the hub to attach to (``ipc://...`` or ``tcp://...``).
        to: the bus address of the reader.
        stage: the ``stage`` of every ``PIPES`` message.
        fallback_path: where messages go if the bus fails mid-run (dagster-pipes' file channel).
        close_timeout_s: at close, how long to wait for the reader's acknowledgement.
        max_queue_messages, max_queue_bytes: queued messages past which ``write_message`` blocks.
    """

    def __init__(
        self,
        hub: str,
        to: str,
        *,
        stage: int = 0,
        fallback_path: str | None = None,
        close_timeout_s: float = CLOSE_ACK_TIMEOUT_S,
        max_queue_messages: int = QUEUE_MAX_MESSAGES,
        max_queue_bytes: int = QUEUE_MAX_BYTES,
    ) -> None:
        self.hub = hub
        self.to = to
        self.stage = stage
        self.fallback_path = fallback_path
        self._close_timeout_s = close_timeout_s
        self._max_messages = max_queue_messages
        self._max_bytes = max_queue_bytes
        self._cond = threading.Condition()  # guards everything below; the loop thread notifies on progress
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._blocked = 0  # writers waiting for room
        self._idle = False  # the loop thread found the queue empty and waits for a wake-up
        self._closing = False
        self._on_file = False  # the bus failed: messages go to fallback_path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._said_oversize = False
        self.sent = 0  # messages handed to the bus
        self.refiled = 0  # messages written to fallback_path
        self.lost = 0  # messages that had nowhere to go (the bus failed and there is no path)

    def start(self, *, attach_timeout_s: float = ATTACH_TIMEOUT_S) -> None:
        """Start the sending thread; returns once attached to the hub.

        Raises:
            PipesBusUnavailable: the hub did not answer within ``attach_timeout_s``, or refused.
        """
        if self.hub.startswith("ipc://") and not _ipc_exists(self.hub):
            raise PipesBusUnavailable(f"no dpipes hub listens at {self.hub}")  # no need to wait for a timeout
        self._thread = threading.Thread(
            target=self._thread_main, args=(attach_timeout_s,), name=f"dpipes Pipes writer to {self.to}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise PipesBusUnavailable(f"the dpipes hub at {self.hub} did not answer: {self._start_error}")
        atexit.register(self.close)

    def write_message(self, message: Mapping[str, Any]) -> None:
        data = json.dumps(message).encode("utf-8")
        if len(data) > MAX_LINE_BYTES:
            data = self._oversize(data)
        wake = False
        with self._cond:
            while (
                not self._on_file
                and not self._closing
                and (len(self._queue) >= self._max_messages or self._queued_bytes >= self._max_bytes)
            ):
                self._blocked += 1
                try:
                    self._cond.wait()
                finally:
                    self._blocked -= 1
            if self._on_file or self._closing:  # the bus failed, or a write after close (atexit went first)
                self._to_file([data])
                return
            self._queue.append(data)
            self._queued_bytes += len(data)
            if self._idle:
                self._idle = False
                wake = True
        if wake:
            self._wake_loop()

    def close(self) -> None:
        """Send what is queued, close the stream (waiting for its acknowledgement), join the thread."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            wake = self._idle
            self._idle = False
            self._cond.notify_all()
        atexit.unregister(self.close)
        if wake:
            self._wake_loop()
        if self._thread is not None:
            self._thread.join()
        with self._cond:  # the thread ended early (a bug): nothing queued may be lost
            if self._queue:
                left = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                self._to_file(left)

    # -- internals -----------------------------------------------------------------------------

    def _oversize(self, data: bytes) -> bytes:
        if not self._said_oversize:
            self._said_oversize = True
            _notice(
                f"a Pipes message of {len(data)} bytes is over the {MAX_LINE_BYTES}-byte limit;"
                " the reader will report it"
            )
        return data[: codec.MAX_PAYLOAD_FRAME_BYTES]  # a bigger frame would cost the connection to the hub

    def _wake_loop(self) -> None:
        assert self._loop is not None and self._wake is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone: close() picks up what is left
            self._loop.call_soon_threadsafe(self._wake.set)

    def _thread_main(self, attach_timeout_s: float) -> None:
        try:
            asyncio.run(self._main(attach_timeout_s))
        finally:
            self._ready.set()

    async def _main(self, attach_timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        client = Client(self.hub, attach_timeout=attach_timeout_s)
        try:
            await client.start()
        except (BusError, zmq.ZMQError) as e:
            self._start_error = e
            return
        try:
            stream = client.endpoint.open_stream(self.to)
            self._ready.set()
            await self._send_all(stream)
        finally:
            await client.aclose()

    async def _send_all(self, stream: OutStream) -> None:
        assert self._wake is not None
        batch: list[bytes] = []
        sent = _Sent()
        try:
            while True:
                batch, done = self._take()
                if done:
                    break
                if not batch:
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                await stream.send(codec.Pipes(stage=self.stage, frames=tuple(batch)))
                sent.add(batch)
                self.sent += len(batch)
                batch = []
            await stream.close(timeout=self._close_timeout_s)
        except (BusError, zmq.ZMQError) as e:
            self._fall_back(sent.bounced(stream.failed_seq) + batch, e, unsure=stream.failed_seq is None)

    def _take(self) -> tuple[list[bytes], bool]:
        """The next batch to send, and whether the channel is closing with nothing left."""
        batch: list[bytes] = []
        with self._cond:
            queue = self._queue
            if not queue:
                self._idle = not self._closing
                return batch, self._closing
            nbytes = 0
            while queue and len(batch) < BATCH_MAX_FRAMES and (not batch or nbytes + len(queue[0]) <= BATCH_MAX_BYTES):
                data = queue.popleft()
                batch.append(data)
                nbytes += len(data)
            self._queued_bytes -= nbytes
            if self._blocked:
                self._cond.notify_all()
        return batch, False

    def _fall_back(self, unsent: list[bytes], error: BaseException, *, unsure: bool) -> None:
        with self._cond:
            self._on_file = True
            left = unsent + list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            where = f"writing them to {self.fallback_path} from now on" if self.fallback_path else "they are lost"
            doubt = "; the last messages sent may not have arrived" if unsure and self.sent else ""
            _notice(
                f"the Pipes bus stream to {self.to} at {self.hub} failed ({error});"
                f" {len(left)} messages not delivered, {where}{doubt}"
            )
            self._to_file(left)
            self._cond.notify_all()

    def _to_file(self, messages: list[bytes]) -> None:
        """Append ``messages`` to the fallback path; the caller holds the lock (so order is kept)."""
        if not messages:
            return
        if self.fallback_path is None:
            self.lost += len(messages)
            return
        try:
            with open(self.fallback_path, "ab") as f:
                f.write(b"".join(m + b"\n" for m in messages))
        except OSError as e:
            self.lost += len(messages)
            _notice(f"cannot write {len(messages)} Pipes messages to {self.fallback_path}: {e}")
            return
        self.refiled += len(messages)


class _Sent:
    """The latest PIPES messages sent, kept until newer ones cover a credit window (what may be in flight)."""

    def __init__(self) -> None:
        self._seq = 0  # the stream numbers its messages 1, 2, ...: ours are its only data messages
        self._kept: collections.deque[tuple[int, list[bytes], int]] = collections.deque()
        self._bytes = 0

    def add(self, batch: list[bytes]) -> None:
        self._seq += 1
        nbytes = sum(len(m) for m in batch)
        self._kept.append((self._seq, batch, nbytes))
        self._bytes += nbytes
        while self._bytes - self._kept[0][2] >= RETAIN_BYTES:
            self._bytes -= self._kept.popleft()[2]

    def bounced(self, seq: int | None) -> list[bytes]:
        """The messages of PIPES message ``seq`` and later: the bus bounced them, they never arrived."""
        if seq is None:
            return []
        return [m for s, batch, _ in self._kept if s >= seq for m in batch]


def _ipc_exists(endpoint: str) -> bool:
    path = endpoint.removeprefix("ipc://")
    return path.startswith("@") or os.path.exists(path)  # '@': a Linux abstract socket, no file
