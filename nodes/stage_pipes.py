"""The Dagster Pipes side of one stage: the bootstrap it is started with, its messages as PIPES frames.

Every stage a node forks gets ``DAGSTER_PIPES_CONTEXT`` and ``DAGSTER_PIPES_MESSAGES``; a program
that never opens Pipes is an ordinary program and costs a FIFO. Each message a program writes
travels to the client as one payload frame of a ``PIPES`` message on a stream from the stage's
endpoint; messages read together share one bus message. A frame is the message's JSON text as
the program wrote it (checked here, never re-encoded), or, for a line that is not a valid Pipes
message, ``{"error": "...", "line": N}`` (reading goes on after it); clients read both with
:mod:`dpipes.nodes.pipes_frames`.

A stage's Pipes options (the ``pipes`` map of the ``start`` request, see
:mod:`dpipes.nodes.pipes_options`), each optional:

``context_data``
    A whole Pipes context to start from, as an orchestrator built it (Dagster's run id, job name,
    asset keys, code versions, provenance, partition key, range and time window, retry number,
    extras). Without it the context is dpipes' own: ``run_id`` is the pipeline id. Keys it lacks
    get dpipes' defaults, so that dagster-pipes finds every key it reads.
``extras``, ``assets``, ``partition``
    Over the context: extras merge key by key, the others replace. The extras a program reads are
    exactly the ones given: dpipes adds none. What dpipes knows about a stage is in its
    environment (``DPIPES_NODE``, ``DPIPES_PIPELINE``, ``DPIPES_STAGE``, ``DPIPES_ARGV``, ...).
``context`` (``env`` | ``file``), ``messages`` (``file`` | ``stderr`` | ``stdout``)
    The context injector and the message channel.
``env``
    Environment variables for the program, over the node's (``{"NAME": "value"}``), as
    :func:`~dpipes.nodes.pipes_options.check_env` allows them.
``stdio``
    The stage's stderr, and the last stage's stdout, also as ``log_external_stream`` messages
    (:class:`StdioTee`): Dagster's ``include_stdio_in_messages``. A middle stage's stdout is
    pipeline data and stays that.
"""

from __future__ import annotations

import codecs
import json
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, Final, Literal

from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import StageError
from dpipes.bus.pipes import BUS_OFFER_KEY, PIPES_MESSAGES_ENV_VAR, PIPES_VERSION_FIELD, encode_bootstrap
from dpipes.nodes.pipes import (
    PipesBadLine,
    PipesBootstrap,
    PipesBusReader,
    PipesLine,
    PipesStdioRecord,
    PipesTextLine,
    bootstrap_env,
    make_context_data,
)
from dpipes.nodes.pipes_options import CONTEXT_INJECTORS, MESSAGE_CHANNELS, check_env

_TMP = tempfile.gettempdir()  # each stage's FIFO and context file go in a private directory here
BATCH_FRAMES = 512  # Pipes messages per PIPES bus message at most
BATCH_BYTES = 256 * 1024  # and about this many bytes (one frame may be larger)
PIPES_PROTOCOL_VERSION: Final = "0.1"  # of the log_external_stream messages a node makes itself
STDIO_TEXT_MAX_CHARS: Final = 64 * 1024  # per log_external_stream message: well inside a Pipes line's limit


def frame_of(record: PipesLine | PipesBadLine) -> bytes:
    """The payload frame of one PIPES message: a valid message as the program wrote it (checked,
    never re-encoded), or the report of a line that was not one (see :mod:`dpipes.nodes.pipes_frames`)."""
    if isinstance(record, PipesLine):
        return record.text or json.dumps(record.message.raw, separators=(",", ":"), allow_nan=True).encode()
    return json.dumps({"error": str(record), "line": record.line_no}).encode()


def stdio_frame(stream: Literal["stdout", "stderr"], text: str) -> bytes:
    """The PIPES frame of a ``log_external_stream`` message carrying ``text`` of a stage's ``stream``."""
    message = {
        PIPES_VERSION_FIELD: PIPES_PROTOCOL_VERSION,
        "method": "log_external_stream",
        "params": {"stream": stream, "text": text, "extras": {}},
    }
    return json.dumps(message, separators=(",", ":")).encode()


class StdioTee:
    """A stage's output stream, also as ``log_external_stream`` messages (the ``stdio`` option).

    The node makes these itself from the output it already reads; the program knows nothing of it
    (dagster-pipes' own tee would mix its stderr into a pipeline's data). Text is decoded as UTF-8
    across chunk boundaries (invalid bytes become U+FFFD) and cut into messages of at most
    ``STDIO_TEXT_MAX_CHARS`` characters.
    """

    def __init__(self, stream: Literal["stdout", "stderr"]) -> None:
        self.stream: Literal["stdout", "stderr"] = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def frames(self, data: bytes, *, end: bool = False) -> list[bytes]:
        """The PIPES frames of one chunk of the stream (``end=True``: the stream's last)."""
        text = self._decoder.decode(data, final=end)
        step = STDIO_TEXT_MAX_CHARS
        return [stdio_frame(self.stream, text[i : i + step]) for i in range(0, len(text), step)]


def stage_context(options: Mapping[str, Any], *, pipeline: str) -> dict[str, Any]:
    """The Pipes context of a stage: ``context_data`` (else dpipes' own), with extras, assets and partition over it.

    Raises:
        StageError: ``context_data`` or its extras is not a map.
    """
    given = options.get("context_data") or {}
    if not isinstance(given, Mapping) or not isinstance(given.get("extras") or {}, Mapping):
        raise StageError("Pipes option context_data must be a map (a Pipes context), its extras a map")
    assets = [str(a) for a in options.get("assets") or []] or None
    partition = options.get("partition") or None
    context = make_context_data(run_id=pipeline)
    context.update(given)
    if assets is not None:
        versions = context.get("code_version_by_asset_key") or {}
        provenance = context.get("provenance_by_asset_key") or {}
        context["asset_keys"] = assets
        context["code_version_by_asset_key"] = {k: versions.get(k) for k in assets}
        context["provenance_by_asset_key"] = {k: provenance.get(k) for k in assets}
    if partition is not None:
        context["partition_key"] = partition
        context["partition_key_range"] = {"start": partition, "end": partition}
        context["partition_time_window"] = None
    context["extras"] = {**(given.get("extras") or {}), **(options.get("extras") or {})}
    return context


def batches_of(frames: list[bytes]) -> Iterator[tuple[bytes, ...]]:
    """Frames grouped into PIPES messages of at most ``BATCH_FRAMES`` frames and about ``BATCH_BYTES``.

    Messages read together travel together: one bus message (and one credit charge, one wake-up
    of the client) for a burst, instead of one per Pipes message.
    """
    start, size = 0, 0
    for i, frame in enumerate(frames):
        size += len(frame)
        if i + 1 - start >= BATCH_FRAMES or size >= BATCH_BYTES:
            yield tuple(frames[start : i + 1])
            start, size = i + 1, 0
    if start < len(frames):
        yield tuple(frames[start:])


class StagePipes:
    """The Pipes bootstrap of one stage, and the channel its messages come back on.

    Args:
        options: what the user asked for: ``extras`` (map), ``assets`` (list), ``partition``,
            ``context`` ("env" | "file"), ``messages`` ("file" | "stderr" | "stdout").
    """

    def __init__(
        self,
        options: Mapping[str, Any],
        *,
        pipeline: str,
        stage: int,
        node: str,
        argv: list[str],
        bus: tuple[Endpoint, str] | None = None,
    ) -> None:
        injector = str(options.get("context", "env"))
        channel = str(options.get("messages", "file"))
        if injector not in CONTEXT_INJECTORS:
            raise StageError(f"--pipes-context {injector!r}: use one of {', '.join(CONTEXT_INJECTORS)}")
        if channel not in MESSAGE_CHANNELS:
            raise StageError(f"--pipes-messages {channel!r}: use one of {', '.join(MESSAGE_CHANNELS)}")
        self.context = stage_context(options, pipeline=pipeline)
        self.channel = channel
        self.stdio = bool(options.get("stdio"))
        user_env = check_env(options.get("env"))
        inject: Literal["env", "file"] = "env" if injector == "env" else "file"
        self.boot: PipesBootstrap[Any]
        self.bus: PipesBusReader | None = None
        if channel == "file":
            self.boot = bootstrap_env(self.context, context_injector=inject, messages_channel="file", tmpdir=_TMP)
            if bus is not None:  # offer the bus beside the FIFO: PipesBusMessageWriter takes it
                self.bus = PipesBusReader(*bus)
                params = {**self.boot.channel.params, **self.bus.params}
                params[BUS_OFFER_KEY]["stage"] = stage
                self.boot.env[PIPES_MESSAGES_ENV_VAR] = encode_bootstrap(params)
        else:
            stream: Literal["stderr", "stdout"] = "stderr" if channel == "stderr" else "stdout"
            self.boot = bootstrap_env(self.context, context_injector=inject, messages_channel=stream, tmpdir=_TMP)
        self.boot.env.update({k: v for k, v in user_env.items() if k not in self.boot.env})

    @property
    def env(self) -> dict[str, str]:
        return self.boot.env

    def split(self, data: bytes, *, end: bool = False) -> tuple[bytes, list[bytes]]:
        """With a stdio channel: a chunk of that stream -> (everything else, PIPES frames).

        Lines that are not messages pass on whole and in order; ``end=True`` (at the stream's
        end) also passes on a last line without a newline.
        """
        records: list[PipesStdioRecord] = self.boot.channel.end() if end else self.boot.channel.feed(data)
        text = bytearray()
        frames = []
        for record in records:
            if isinstance(record, PipesTextLine):
                text += record.text + (b"" if record.partial else b"\n")
            else:
                frames.append(frame_of(record))
        return bytes(text), frames

    @property
    def directory(self) -> str:
        """The bootstrap's private directory (its FIFO, its context file)."""
        return self.boot.directory

    def close(self, *, remove_directory: bool = True) -> None:
        """Stop reading; remove the bootstrap's files (``remove_directory`` false: the caller does)."""
        if self.bus is not None:
            self.bus.close()
        self.boot.close(remove_directory=remove_directory)
