"""A Dagster ``PipesClient`` that runs its command as a dpipes pipeline, on any node of the LAN.

Inside an asset, ``dpipes.run(context=context, command="python3@beta job.py", extras={...})``
runs the pipeline text (one stage or several, each on its chosen node) and returns Dagster's
completed invocation, so that ``.get_results()`` and ``.get_materialize_result()`` work as with
Dagster's own ``PipesSubprocessClient``. The client is a Dagster resource: its fields (the entry
node, environment, stdio) are configuration.

How the two sides meet:

* Context. Dagster builds the Pipes context (its run id, job name, asset keys, code versions,
  provenance, partition key, range and time window, retry number, the extras as given) and a
  context injector of this client hands it to dpipes as the run's ``context_data``: every stage
  starts with that context. The nodes inject it (``DAGSTER_PIPES_CONTEXT``) and open the message
  channel (``DAGSTER_PIPES_MESSAGES``) themselves, on whichever host the stage runs.
* Messages. Every stage's messages reach this process over the bus as they are written, and are
  handed at once to Dagster's ``PipesMessageHandler``: logs appear in the run as they happen,
  materializations and checks are buffered by Dagster until the asset returns its results. The
  pipeline is one Pipes session to Dagster: the first stage's ``opened`` opens it, and it closes
  once every stage has reported, with the first stage's exception if any stage closed with one.
* Output. ``include_stdio_in_messages`` asks the nodes for each stage's stderr and the last
  stage's stdout as ``log_external_stream`` messages, which Dagster writes to the step's
  stdout/stderr (its compute logs) as they come. Otherwise ``forward_stdio`` writes them there
  at the end, as ``PipesSubprocessClient`` forwards its process's output.
* Failure. A stage that exits non-zero, a Pipes session closed with an exception, a node that
  refuses or is lost: ``DagsterPipesExecutionError``, naming the stage, its node and status.

What dpipes knows about a stage (node, pipeline id, stage number, argv) is in the stage's
environment (``DPIPES_NODE``, ``DPIPES_PIPELINE``, ``DPIPES_STAGE``, ``DPIPES_ARGV``), never in
the extras.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

from dagster import (
    AssetExecutionContext,
    ConfigurableResource,
    OpExecutionContext,
    PipesClient,
    PipesClientCompletedInvocation,
    PipesContextInjector,
    PipesMessageHandler,
    PipesMessageReader,
    open_pipes_session,
)
from dagster._core.errors import DagsterPipesExecutionError  # what Dagster's own Pipes clients raise
from pydantic import Field

from dpipes.bus.errors import DpipesError
from dpipes.nodes.pipes_session import PipesResult, run_pipes

__all__ = ["DpipesCompletedInvocation", "DpipesPipesClient"]

log = logging.getLogger(__name__)

NODE_ENV_VAR = "DPIPES_NODE"  # as for the dpipes command: the entry node when none is configured
CANCEL_WAIT_S = 15.0  # an interrupted step waits this long for the cancelled run to wind down

T = TypeVar("T")


class DpipesCompletedInvocation(PipesClientCompletedInvocation):
    """Dagster's completed invocation, with what dpipes saw of the run (stdout, every stage's exit)."""

    def __init__(self, session: Any, result: PipesResult) -> None:
        super().__init__(session)
        self.result = result


class _ContextToDpipes(PipesContextInjector):
    """Keeps the context Dagster built; the nodes inject it into every stage."""

    def __init__(self) -> None:
        self.context_data: Mapping[str, Any] = {}

    @contextlib.contextmanager
    def inject_context(self, context_data: Any) -> Iterator[dict[str, Any]]:
        self.context_data = dict(context_data)
        yield {}

    def no_messages_debug_text(self) -> str:
        return "dpipes nodes injected the context into every stage (DAGSTER_PIPES_CONTEXT)."


class _MessagesFromDpipes(PipesMessageReader):
    """Hands every stage's messages to Dagster's handler as they arrive, as one Pipes session."""

    def __init__(self) -> None:
        self._handler: PipesMessageHandler | None = None
        self._opened = False
        self._closed: dict[int, Mapping[str, Any]] = {}  # by stage

    @contextlib.contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        self._handler = handler
        yield {}

    def deliver(self, stage: int, message: Mapping[str, Any]) -> None:
        """One stage's message, validated by its node."""
        method = message.get("method")
        if method == "opened":
            if self._opened:  # a later stage opening: the session is open already
                return
            self._opened = True
        elif method == "closed":  # held until every stage is done: a closed session takes nothing more
            self._closed[stage] = message
            return
        self._handle(message)

    def close(self) -> None:
        """The run is over: close the session, with the exception of the first stage that closed with one."""
        closed = [self._closed[stage] for stage in sorted(self._closed)]
        failed = [m for m in closed if (m.get("params") or {}).get("exception")]
        if closed:
            self._handle(failed[0] if failed else closed[-1])

    def _handle(self, message: Mapping[str, Any]) -> None:
        assert self._handler is not None, "read_messages is not open"
        try:
            self._handler.handle_message(message)  # type: ignore[arg-type]
        except Exception:  # Dagster refused a message: say so in the run, as its own readers do
            self._handler.report_pipes_framework_exception(type(self).__name__, sys.exc_info())

    def no_messages_debug_text(self) -> str:
        return (
            "dpipes nodes opened a message channel for every stage (DAGSTER_PIPES_MESSAGES); "
            "a program that never calls open_dagster_pipes() sends no messages."
        )


class DpipesPipesClient(ConfigurableResource, PipesClient):
    """Runs a command as a dpipes pipeline under Dagster Pipes; a Dagster resource.

    ``run`` is ``PipesSubprocessClient.run`` with a dpipes pipeline text for the command:
    ``"python3@beta job.py"`` runs ``job.py`` on node beta, ``"cat data.csv | python3@beta
    load.py"`` two stages that both report. Over TCP the client attaches as ``dpipes --node``
    does: with your client key and the node's key pinned in known_nodes (``insecure`` for a node
    started with ``--insecure``).
    """

    node: str | None = Field(
        default=None,
        description="Entry node, [NAME@]HOST:PORT (with keys, as dpipes --node) or a tcp:// or ipc:// endpoint. "
        "Default: $DPIPES_NODE, else "
        "this host's running dpipesd, else a node embedded in the step's process for the run.",
    )
    insecure: bool = Field(
        default=False,
        description="Attach to a TCP node without keys: for a node started with --insecure (nothing is encrypted).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for every stage's program (names such as PATH, LD_*, PYTHON*, "
        "DPIPES_* are refused by the nodes).",
    )
    include_stdio_in_messages: bool = Field(
        default=False,
        description="Ask the nodes for each stage's stderr and the last stage's stdout as Pipes "
        "log_external_stream messages, shown in the step's compute logs as they come.",
    )
    forward_stdio: bool = Field(
        default=True,
        description="At the end, write the pipeline's stdout and its stages' stderr to the step's own "
        "(unless they came as log_external_stream messages).",
    )
    context_injector: str = Field(default="env", description="How the nodes inject the context: env or file.")
    messages_channel: str = Field(
        default="file", description="Where the stages write their messages: file (a FIFO), stderr or stdout."
    )

    def run(  # type: ignore[override]
        self,
        *,
        context: OpExecutionContext | AssetExecutionContext,
        command: str,
        extras: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        stage_options: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> DpipesCompletedInvocation:
        """Run ``command``, a dpipes pipeline text, in a Pipes session of ``context``.

        Args:
            context: the asset's or op's context.
            command: the pipeline, as given to ``dpipes`` (``"python3@beta job.py"``).
            extras: what the program reads as ``context.extras``, exactly.
            env: environment variables for every stage, over the resource's ``env``.
            input: bytes for the first stage's stdin (default: none).
            stage_options: a stage number's own Pipes options (``extras``, ``env``, ...).

        Returns:
            The completed invocation: ``.get_results()``, ``.get_materialize_result()``, and
            ``.result``, what dpipes saw of the run.

        Raises:
            DagsterPipesExecutionError: a stage failed, or dpipes could not run the pipeline.
        """
        injector, reader = _ContextToDpipes(), _MessagesFromDpipes()
        with open_pipes_session(
            context=context, context_injector=injector, message_reader=reader, extras=extras
        ) as session:
            env = {**self.env, **(env or {})}
            try:
                result = _run_beside(
                    lambda on_message: self._run_pipes(
                        command, injector.context_data, env, input, stage_options, on_message
                    ),
                    reader.deliver,
                )
            except DpipesError as exc:  # RunFailed, or a node named wrong or not pinned
                raise DagsterPipesExecutionError(f"dpipes could not run {command!r}: {exc}") from None
            finally:
                reader.close()
            if self.forward_stdio and not self.include_stdio_in_messages:  # else it came as messages
                _forward(result)
            if failure := _failure(result):
                raise DagsterPipesExecutionError(f"dpipes pipeline {result.pipeline} ({command!r}) failed: {failure}")
        return DpipesCompletedInvocation(session, result)

    async def _run_pipes(
        self,
        command: str,
        context_data: Mapping[str, Any],
        env: Mapping[str, str],
        input: bytes | None,
        stage_options: Mapping[int, Mapping[str, Any]] | None,
        on_message: Callable[[int, Mapping[str, Any]], None],
    ) -> PipesResult:
        return await run_pipes(
            command,
            node=await self._entry(),
            insecure=self.insecure,
            context_data=context_data,
            env=env,
            stdio=self.include_stdio_in_messages,
            context_injector=self.context_injector,
            messages_channel=self.messages_channel,
            stage_options=stage_options,
            input=input,
            on_message=on_message,
        )

    async def _entry(self) -> str | None:
        """The entry node: configured, else ``$DPIPES_NODE``, else the local daemon, else None (embedded)."""
        if self.node:
            return self.node
        if from_env := os.environ.get(NODE_ENV_VAR):
            return from_env
        from dpipes.nodes.run import local_daemon

        return await local_daemon()


def _run_beside(
    run: Callable[[Callable[[int, Mapping[str, Any]], None]], Coroutine[Any, Any, T]],
    deliver: Callable[[int, Mapping[str, Any]], None],
) -> T:
    """Run ``run(on_message)`` on an event loop in a thread of its own; ``deliver`` each message here.

    Dagster handles a message slowly (a log goes through its loggers into its event log) and
    synchronously: done on the run's event loop, 10k logs starve the bus client of its heartbeats
    and the node is declared lost. So the loop only queues each message, and the step's own
    thread hands them to Dagster as they come. Should the step be interrupted (Dagster raises in
    this thread), the run is cancelled and the interrupt goes on.
    """
    inbox: queue.SimpleQueue[tuple[int, Mapping[str, Any]] | None] = queue.SimpleQueue()
    outcome: dict[str, Any] = {}
    started: dict[str, Any] = {}

    async def main() -> T:
        started["loop"], started["task"] = asyncio.get_running_loop(), asyncio.current_task()
        return await run(lambda stage, message: inbox.put((stage, message)))

    def loop_thread() -> None:
        try:
            outcome["result"] = asyncio.run(main())
        except BaseException as exc:  # handed to the step's thread, which raises it
            outcome["error"] = exc
        finally:
            inbox.put(None)

    thread = threading.Thread(target=loop_thread, name="dpipes-run", daemon=True)
    thread.start()
    try:
        while (item := inbox.get()) is not None:
            deliver(*item)
    except BaseException:
        if "task" in started:
            started["loop"].call_soon_threadsafe(started["task"].cancel)
        thread.join(CANCEL_WAIT_S)
        raise
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _forward(result: PipesResult) -> None:
    """Write the output the run collected to the step's own stdout and stderr."""
    if result.stdout:
        sys.stdout.write(result.stdout.decode(errors="replace"))
        sys.stdout.flush()
    stderr = _stages_stderr(result)
    if stderr:
        sys.stderr.write(stderr.decode(errors="replace"))
        sys.stderr.flush()


def _stages_stderr(result: PipesResult) -> bytes:
    """The stages' own stderr, without the lines the run's client wrote beside it.

    ``run_pipes`` collects the stages' stderr (untagged) and its client's report of their Pipes
    messages (logs, closing exceptions: tagged ``[stage N prog@node] ``) in one file. The report
    is what Dagster already has from the messages: leave it out rather than log everything twice.
    """
    tags = tuple(f"[stage {s.index} {s.argv[0] if s.argv else '?'}@{s.node}] ".encode() for s in result.stages)
    return b"".join(line for line in result.stderr.splitlines(keepends=True) if not line.startswith(tags))


def _failure(result: PipesResult) -> str:
    """Why the run failed, for a person, or "" when it did not."""
    if result.exit_code == 0:
        return ""
    if result.error:
        return result.error
    parts = []
    for stage in result.stages:
        if stage.exit_code != 0 or stage.exception is not None:
            text = f"stage {stage.index} {stage.argv[0] if stage.argv else '?'}@{stage.node}: {stage.status}"
            if stage.exception is not None:
                text += f" (Pipes closed with {stage.exception})"
            parts.append(text)
    return "; ".join(parts) or f"exit {result.exit_code}"
