"""The runner and its harness: callbacks in order, the anchor rules, failures named and reported."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from dpipes.bus.pipes import parse_message
from dpipes.nodes.plugins.api import Anchor, AnchorSpec, Environment, Plugin, Provider
from dpipes.nodes.plugins.errors import (
    AnchorClosed,
    CallbackFailed,
    CallbackTimeout,
    PluginError,
    SchemaChanged,
    UnknownAnchor,
)
from dpipes.nodes.plugins.harness import PluginTestService
from dpipes.nodes.plugins.runner import PluginRunner
from dpipes.nodes.plugins.transport import MemoryMessageChannel, MemoryTransport

SCHEMA = pa.schema([("n", pa.int64())])
BLOCK_GUARD_S = 30.0  # a test transport holds a write at most this long, so a broken runner fails, not hangs


class Recorder(Plugin):
    """Writes every batch through and records the callbacks it got, in order."""

    def __init__(self, provider: Provider) -> None:
        super().__init__(provider)
        self.calls: list[tuple[Any, ...]] = []

    def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
        self.calls.append(("batch", anchor, batch.num_rows))
        self.provider.write_to_anchor("Output", batch)

    def on_incoming_connection_complete(self, anchor: Anchor) -> None:
        self.calls.append(("end", anchor))

    def on_complete(self) -> None:
        self.calls.append(("complete",))


def table(*values: int) -> pa.Table:
    return pa.table({"n": pa.array(values, pa.int64())})


def test_callbacks_run_in_order_and_outputs_are_kept_per_anchor() -> None:
    with PluginTestService(Recorder, {"Input": SCHEMA}, ["Output"]) as service:
        service.run_on_record_batch(table(1, 2), "Input")
        service.run_on_record_batch(table(3).to_batches()[0], Anchor("Input", "#2"))  # a RecordBatch: a Table arrives
        service.run_on_incoming_connection_complete("Input")
        service.run_on_complete()
        assert service.plugin.calls == [
            ("batch", Anchor("Input", "#1"), 2),
            ("batch", Anchor("Input", "#2"), 1),
            ("end", Anchor("Input", "#1")),
            ("complete",),
        ]
        assert service.output("Output").column("n").to_pylist() == [1, 2, 3]
        assert [b.num_rows for b in service.data_streams["Output"]] == [2, 1]
        assert service.closed == {"Output"}  # closed after on_complete, though the plugin did not


def test_callbacks_never_overlap_when_the_engine_calls_from_several_threads() -> None:
    inside = threading.Lock()
    overlaps = []

    class Slow(Recorder):
        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            if not inside.acquire(blocking=False):
                overlaps.append(anchor)
                return
            try:
                for _ in range(2000):  # some work, so that an overlap would show
                    pa.table({"x": [1]})
            finally:
                inside.release()

    with PluginTestService(Slow, ["Input"], ["Output"]) as service:
        threads = [
            threading.Thread(target=service.run_on_record_batch, args=(table(i), Anchor("Input", f"#{i}")))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert overlaps == []


def test_io_messages_are_valid_pipes_messages() -> None:
    class Talks(Recorder):
        def on_complete(self) -> None:
            self.provider.io.info("read %d rows from %s", 3, "Input")
            self.provider.io.warn("careful")
            self.provider.io.error("bad %s")  # no args: not formatted
            self.provider.io.update_progress(0.5)
            self.provider.io.update_progress(0.501)  # under the step: not sent
            self.provider.io.update_progress(1)

    with PluginTestService(Talks, [], ["Output"]) as service:
        service.run_on_complete()
        assert service.io_stream == ["INFO:read 3 rows from Input", "WARNING:careful", "ERROR:bad %s"]
        assert service.progress == [0.5, 1.0]
        parsed = [parse_message(json.dumps(m)) for m in service.io_messages]  # the project's own Pipes validator
        assert [m.method for m in parsed] == ["log"] * 3 + ["report_custom_message"] * 2
        assert parsed[-1].params["payload"] == {"type": "dpipes.progress", "fraction": 1.0}


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), "half", True])
def test_progress_out_of_range_is_refused(fraction: Any) -> None:
    class Progress(Recorder):
        def on_complete(self) -> None:
            self.provider.io.update_progress(fraction)

    with PluginTestService(Progress, [], ["Output"]) as service:
        with pytest.raises(CallbackFailed) as info:
            service.run_on_complete()
        assert isinstance(info.value.__cause__, ValueError)


def test_an_exception_is_reported_with_its_traceback_and_fails_the_runner() -> None:
    class Boom(Recorder):
        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            raise KeyError("missing column")

    with PluginTestService(Boom, ["Input"], ["Output"]) as service:
        with pytest.raises(CallbackFailed, match=r"on_record_batch .*KeyError") as info:
            service.run_on_record_batch(table(1), "Input")
        assert isinstance(info.value.__cause__, KeyError)
        (report,) = service.io_stream
        assert report.startswith("ERROR:plugin Boom: on_record_batch")
        assert "Traceback" in report and "missing column" in report and "in on_record_batch" in report
        with pytest.raises(PluginError, match="failed earlier"):  # no callback after a failure
            service.run_on_incoming_connection_complete("Input")


def test_an_exception_in_init_fails_construction() -> None:
    class BadInit(Recorder):
        def __init__(self, provider: Provider) -> None:
            raise RuntimeError("no config")

    with pytest.raises(CallbackFailed, match="__init__ raised RuntimeError: no config"):
        PluginTestService(BadInit, [], ["Output"])


def test_writing_to_an_anchor_that_does_not_exist_is_named() -> None:
    class Typo(Recorder):
        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            self.provider.write_to_anchor("Ouptut", batch)

    with PluginTestService(Typo, ["Input"], ["Output"]) as service:
        with pytest.raises(UnknownAnchor, match=r"no outgoing anchor 'Ouptut' .*'Output'"):
            service.run_on_record_batch(table(1), "Input")
        assert "Ouptut" in service.io_stream[0]


def test_a_rule_broken_is_named_even_when_the_plugin_swallows_it() -> None:
    class Swallows(Recorder):
        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            try:
                self.provider.write_to_anchor("Nowhere", batch)
            except Exception:
                pass

    with PluginTestService(Swallows, ["Input"], ["Output"]) as service:
        with pytest.raises(UnknownAnchor):
            service.run_on_record_batch(table(1), "Input")


def test_a_schema_that_changes_mid_stream_on_an_outgoing_anchor_is_named() -> None:
    class Drifts(Recorder):
        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            if batch.num_rows == 1:
                batch = batch.cast(pa.schema([("n", pa.float64())]))
            self.provider.write_to_anchor("Output", batch)

    with PluginTestService(Drifts, ["Input"], ["Output"]) as service:
        service.run_on_record_batch(table(1, 2), "Input")
        with pytest.raises(
            SchemaChanged, match="'Output' changed schema mid-stream from \\(n: int64\\) to \\(n: double\\)"
        ):
            service.run_on_record_batch(table(3), "Input")
        assert service.output("Output").num_rows == 2  # what was written before stays, one schema


def test_pushed_metadata_fixes_the_schema_and_names_an_empty_output() -> None:
    class Pushes(Recorder):
        def __init__(self, provider: Provider) -> None:
            super().__init__(provider)
            provider.push_outgoing_metadata("Output", SCHEMA)

        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            self.provider.write_to_anchor("Output", batch.cast(pa.schema([("n", pa.int32())])))

    with PluginTestService(Pushes, ["Input"], ["Output"]) as service:
        assert service.provider.outgoing_anchors["Output"].schema == SCHEMA
        service.run_on_incoming_connection_complete("Input")
        service.run_on_complete()
        assert service.output("Output").schema == SCHEMA and service.output("Output").num_rows == 0
    with PluginTestService(Pushes, ["Input"], ["Output"]) as service, pytest.raises(SchemaChanged):
        service.run_on_record_batch(table(1), "Input")


def test_a_batch_that_differs_from_its_anchor_in_metadata_only_leaves_with_the_anchors() -> None:
    tagged = SCHEMA.with_metadata({"source": "declared"})

    class Pushes(Recorder):
        def __init__(self, provider: Provider) -> None:
            super().__init__(provider)
            provider.push_outgoing_metadata("Output", tagged)

        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            self.provider.write_to_anchor("Output", batch.replace_schema_metadata({"source": "input"}))
            self.provider.write_to_anchor("Output", batch.replace_schema_metadata(None))

    with PluginTestService(Pushes, ["Input"], ["Output"]) as service:
        service.run_on_record_batch(table(1, 2), "Input")
        service.run_on_complete()
        written = service.transport.batches["Output"]  # as the worker's transport gets them
        assert [b.num_rows for b in written] == [2, 2]
        assert all(b.schema.equals(tagged, check_metadata=True) for b in written)


def test_writing_after_close_is_named() -> None:
    class Closes(Recorder):
        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            self.provider.write_to_anchor("Output", batch)
            self.provider.close_outgoing_anchor("Output")

    with PluginTestService(Closes, ["Input"], ["Output"]) as service:
        service.run_on_record_batch(table(1), "Input")
        with pytest.raises(AnchorClosed):
            service.run_on_record_batch(table(2), "Input")


def test_input_rules_unknown_anchor_declared_schema_and_order() -> None:
    with PluginTestService(Recorder, {"Input": SCHEMA}, ["Output"]) as service:
        with pytest.raises(UnknownAnchor, match="no input anchor 'Left'"):
            service.run_on_record_batch(table(1), "Left")
        with pytest.raises(SchemaChanged, match="input anchor 'Input'"):
            service.run_on_record_batch(pa.table({"n": ["x"]}), "Input")
        service.run_on_incoming_connection_complete("Input")
        with pytest.raises(PluginError, match="already ended"):
            service.run_on_record_batch(table(1), "Input")


def test_a_callback_that_never_returns_is_bounded_by_the_timeout() -> None:
    release = threading.Event()

    class Hangs(Recorder):
        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            release.wait()

    try:
        with PluginTestService(Hangs, ["Input"], ["Output"], callback_timeout_s=0.2) as service:
            with pytest.raises(CallbackTimeout, match=r"on_record_batch .* did not return within 0.2 s"):
                service.run_on_record_batch(table(1), "Input")
            assert service.io_stream[0].startswith("ERROR:plugin Hangs: on_record_batch")
            with pytest.raises(PluginError, match="failed earlier"):
                service.run_on_complete()
    finally:
        release.set()  # let the abandoned thread end, so the test process keeps no stuck thread


def test_run_feeds_every_input_then_completes_unconnected_optional_inputs() -> None:
    transport, channel = MemoryTransport(), MemoryMessageChannel()
    env = Environment(pipeline="p1", stage=2, node="alpha", plugin="rec", temp_dir=Path("."))
    with PluginRunner(
        Recorder,
        incoming=[AnchorSpec("Left"), AnchorSpec("Right", optional=True)],
        outgoing=["Output"],
        environment=env,
        transport=transport,
        channel=channel,
    ) as runner:
        runner.run({"Left": [table(1), table(2, 3)]})
        assert runner.plugin.calls == [
            ("batch", Anchor("Left", "#1"), 1),
            ("batch", Anchor("Left", "#1"), 2),
            ("end", Anchor("Left", "#1")),
            ("end", Anchor("Right", "#1")),
            ("complete",),
        ]
    assert transport.table("Output").column("n").to_pylist() == [1, 2, 3]
    assert runner.provider.environment.stage == 2


def test_update_only_runs_init_alone_and_keeps_pushed_schemas() -> None:
    class Pushes(Recorder):
        def __init__(self, provider: Provider) -> None:
            super().__init__(provider)
            if provider.environment.update_only:
                provider.push_outgoing_metadata("Output", SCHEMA)

    with PluginTestService(Pushes, ["Input"], ["Output"], update_only=True) as service:
        service.run_on_record_batch(table(1), "Input")
        service.run_on_incoming_connection_complete("Input")
        service.run_on_complete()
        assert service.plugin.calls == []
        assert service.schemas == {"Output": SCHEMA} and service.data_streams["Output"] == []


def test_provider_gives_config_environment_and_anchors() -> None:
    seen: dict[str, Any] = {}

    class Looks(Recorder):
        def __init__(self, provider: Provider) -> None:
            super().__init__(provider)
            seen.update(
                config=provider.tool_config,
                env=provider.environment,
                incoming=dict(provider.incoming_anchors),
                outgoing=list(provider.outgoing_anchors),
                logger=provider.logger.name,
            )

    with PluginTestService(Looks, {"Input": SCHEMA}, ["True", "False"], {"expr": "n > 1"}) as service:
        env = seen["env"]
        assert seen["config"] == {"expr": "n > 1"}
        assert env.plugin == "Looks" and env.temp_dir.is_dir() and not env.update_only
        assert seen["incoming"] == {"Input": AnchorSpec("Input", SCHEMA)}
        assert seen["outgoing"] == ["True", "False"]
        assert seen["logger"] == "dpipes.plugin.Looks"
        temp = env.temp_dir
        service.run_on_complete()
    assert not temp.exists()  # the harness removes the plugin's temp dir


def test_io_goes_through_any_dagster_pipes_channel(tmp_path: Path) -> None:
    """The message seam is dagster-pipes' own channel ABC: its file channel writes lines the Pipes reader accepts."""
    from dagster_pipes import PipesFileMessageWriterChannel

    class Fails(Recorder):
        def on_complete(self) -> None:
            self.provider.io.update_progress(0.25)
            raise ValueError("bad row 7")

    path = tmp_path / "messages.jsonl"
    env = Environment(pipeline="p", stage=0, node="alpha", plugin="fails", temp_dir=tmp_path)
    with PluginRunner(
        Fails,
        outgoing=["Output"],
        environment=env,
        transport=MemoryTransport(),
        channel=PipesFileMessageWriterChannel(str(path)),
    ) as runner:
        with pytest.raises(CallbackFailed):
            runner.run()
    messages = [parse_message(line) for line in path.read_bytes().splitlines()]
    assert [m.method for m in messages] == ["report_custom_message", "log"]
    assert messages[1].params["level"] == "ERROR" and "ValueError: bad row 7" in messages[1].params["message"]


def test_each_connection_into_an_anchor_is_its_own_stream() -> None:
    class Counts(Recorder):
        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            self.calls.append((anchor.connection, batch.schema.names))

    with PluginTestService(Counts, ["Input"], ["Output"]) as service:
        service.run_on_record_batch(table(1), Anchor("Input", "#1"))
        service.run_on_record_batch(pa.table({"s": ["a"]}), Anchor("Input", "#2"))  # another stream, another schema
        with pytest.raises(SchemaChanged, match="'Input' \\(connection #2\\) changed schema"):
            service.run_on_record_batch(table(2), Anchor("Input", "#2"))
        assert service.plugin.calls == [("#1", ["n"]), ("#2", ["s"])]


def test_a_class_that_is_not_a_plugin_is_refused_before_it_runs() -> None:
    from dpipes.nodes.plugins.errors import NotAPlugin

    with pytest.raises(NotAPlugin, match="has no on_record_batch"):
        PluginTestService(dict, ["Input"], ["Output"])


def make_runner(
    plugin: type, *, timeout_s: float | None = None, transport: MemoryTransport | None = None
) -> tuple[PluginRunner, MemoryTransport]:
    """A runner of ``plugin`` with one input and one output anchor, over ``transport`` (else a new one)."""
    if transport is None:
        transport = MemoryTransport()
    env = Environment(pipeline="p", stage=0, node="alpha", plugin="rec", temp_dir=Path("."))
    runner = PluginRunner(
        plugin,
        incoming=["Input"],
        outgoing=["Output"],
        environment=env,
        transport=transport,
        channel=MemoryMessageChannel(),
        callback_timeout_s=timeout_s,
    )
    return runner, transport


def test_time_blocked_in_the_transport_does_not_count_against_the_timeout() -> None:
    """A slow reader downstream holds a write (flow control); the plugin's own time is what is bounded."""
    runner: PluginRunner

    class SlowReader(MemoryTransport):
        def write(self, name: str, batch: pa.RecordBatch) -> None:
            deadline = time.monotonic() + BLOCK_GUARD_S
            # held until the callback's deadline has passed at least once while we hold it
            while runner.flow_control_extensions == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # polling a condition under a deadline
            super().write(name, batch)

    # the plugin's own code takes microseconds: 1 s is generous even on a loaded machine
    runner, transport = make_runner(Recorder, timeout_s=1.0, transport=SlowReader())
    with runner:
        runner.run({"Input": [table(1, 2)]})
    assert runner.flow_control_extensions > 0
    assert transport.table("Output").num_rows == 2


def test_feed_makes_the_calls_record_batch_would_in_one_hand_over() -> None:
    fed, _ = make_runner(Recorder)
    one_by_one, _ = make_runner(Recorder)
    batches = [table(1, 2), table(3).to_batches()[0], table()]
    with fed, one_by_one:
        fed.start()
        fed.feed("Input", iter(batches), connection="#2")
        one_by_one.start()
        for batch in batches:
            one_by_one.record_batch("Input", batch, connection="#2")
        one_by_one.incoming_complete("Input", connection="#2")
        assert fed.plugin.calls == one_by_one.plugin.calls
        assert fed.plugin.calls[-1] == ("end", Anchor("Input", "#2"))
        with pytest.raises(PluginError, match="already ended"):
            fed.record_batch("Input", table(4), connection="#2")
        fed.complete()


def test_feed_names_what_went_wrong_and_whose_fault_it_was() -> None:
    def broken_input() -> Any:
        yield table(1)
        raise ValueError("the input did not convert")

    runner, _ = make_runner(Recorder)
    with runner:
        runner.start()
        with pytest.raises(ValueError, match="the input did not convert"):
            runner.feed("Input", broken_input())
        assert runner.failure is None  # the input's fault, not the plugin's

    runner, _ = make_runner(Recorder)
    with runner:
        runner.start()
        with pytest.raises(SchemaChanged, match="changed schema mid-stream"):
            runner.feed("Input", [table(1), pa.table({"n": ["one"]})])
        assert runner.failure is None

    class Raises(Recorder):
        def on_incoming_connection_complete(self, anchor: Anchor) -> None:
            raise ZeroDivisionError("its own bug")

    runner, _ = make_runner(Raises)
    with runner:
        runner.start()
        with pytest.raises(CallbackFailed, match=r"on_incoming_connection_complete .* raised ZeroDivisionError"):
            runner.feed("Input", [table(1)])
        assert isinstance(runner.failure, CallbackFailed)


def test_feed_bounds_the_plugins_own_time_not_the_wait_for_input() -> None:
    release = threading.Event()
    runner: PluginRunner

    def slow_input() -> Any:
        deadline = time.monotonic() + BLOCK_GUARD_S
        # the next batch comes only once the callback's deadline has passed while we waited for it
        while runner.flow_control_extensions == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a condition under a deadline
        yield table(1)
        yield table(2)  # this one hangs

    class HangsOnTheSecond(Recorder):
        def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
            super().on_record_batch(batch, anchor)
            if len(self.calls) == 2:
                release.wait()

    runner, _ = make_runner(HangsOnTheSecond, timeout_s=1.0)
    try:
        with runner:
            runner.start()
            with pytest.raises(CallbackTimeout, match=r"on_record_batch .* did not return within 1 s"):
                runner.feed("Input", slow_input())
            assert runner.flow_control_extensions > 0  # the wait for input moved the deadline
            assert [c[2] for c in runner.plugin.calls] == [1, 1]
    finally:
        release.set()


def test_the_transport_clock_counts_each_block_once_and_stands_still_between_them() -> None:
    """The clock of time in the transport, entered again and again: blocks add up, time outside adds nothing."""
    runner, _ = make_runner(Recorder)
    provider = runner.provider
    clock = provider.waiting()
    assert provider.blocked_s() == 0.0

    def spend_time() -> None:
        start = time.monotonic()
        while time.monotonic() == start:  # until the clock has moved at all
            pass

    totals = []
    for _ in range(2):
        with clock:
            spend_time()
            assert provider.blocked_s() > (totals[-1] if totals else 0.0)  # the current block counts
        totals.append(provider.blocked_s())
        spend_time()
        assert provider.blocked_s() == totals[-1]  # outside a block the clock stands still
    assert totals[1] > totals[0] > 0.0
    runner.close()
