"""dpipes-tap against real daemons running real two-node pipelines: every verb, record/replay, losses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dpipes.nodes.run import known_nodes
from dpipes.nodes.tap import verbs
from dpipes.nodes.tap.source import TapSource, Target, resolve
from tests.nodes.daemons import Daemon, daemons, dpipes, environment
from tests.procs import children_of

WAIT_S = 60.0  # a generous bound for a loaded machine; every wait ends as soon as its condition holds

PIPES_PROGRAM = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("hello from the stage")
    pipes.log.warning("careful")
    pipes.report_asset_materialization(asset_key="orders")
"""


@contextlib.asynccontextmanager
async def two_nodes(rt: Path) -> AsyncIterator[tuple[Daemon, Daemon]]:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        yield alpha, beta


async def tap_sees_traffic(source: TapSource, alpha: Daemon) -> None:
    """Wait until ``source`` is subscribed: ask alpha for its nodes until an event arrives."""

    async def poll() -> None:
        while source.received == 0:
            await known_nodes(alpha.tcp)
            await source.next(0.5)

    await asyncio.wait_for(poll(), WAIT_S)


async def collect(gen: AsyncIterator[verbs.Out], until: Any) -> list[verbs.Out]:
    """Lines of a verb until ``until(lines)`` holds."""
    got: list[verbs.Out] = []

    async def run() -> None:
        async for out in gen:
            got.append(out)
            if until(got):
                return

    await asyncio.wait_for(run(), WAIT_S)
    return got


async def started_tap(rt: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dpipes.tools.tap",
        *args,
        env=environment(rt),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_lines_until(proc: asyncio.subprocess.Process, until: Any) -> list[str]:
    lines: list[str] = []

    async def run() -> None:
        assert proc.stdout is not None
        while not until(lines):
            raw = await proc.stdout.readline()
            assert raw, f"dpipes-tap ended early: {(await proc.stderr.read()).decode()}"  # type: ignore[union-attr]
            lines.append(raw.decode())

    await asyncio.wait_for(run(), WAIT_S)
    return lines


async def subscribed_cli(proc: asyncio.subprocess.Process, alpha: Daemon) -> list[str]:
    """Wait until a ``echo --json`` process shows events: ask alpha for its nodes until it does."""
    assert proc.stdout is not None
    while True:
        await known_nodes(alpha.tcp)
        try:
            raw = await asyncio.wait_for(proc.stdout.readline(), 0.5)
        except TimeoutError:
            continue
        return [raw.decode()]


async def recording(proc: asyncio.subprocess.Process, alpha: Daemon) -> None:
    """Wait until a ``record`` process says events arrive: ask alpha for its nodes until it does."""
    assert proc.stderr is not None
    while True:
        await known_nodes(alpha.tcp)
        try:
            line = await asyncio.wait_for(proc.stderr.readline(), 0.5)
        except TimeoutError:
            continue
        assert b"events arrive" in line, line
        return


async def finished(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, err
    return out.decode(), err.decode()


async def stop(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    return out.decode(), err.decode()


def stage_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def all_exited(events: list[dict[str, Any]], stages: int) -> bool:
    """Have ``stages`` exit reports reached a coordinator (``<node>/ctl``)?"""
    reports = [e for e in events if e.get("method") == "exit" and e["kind"] == "REQUEST" and e["dst"].endswith("/ctl")]
    return len(reports) >= stages


# -- echo ------------------------------------------------------------------------------------


async def test_echo_decodes_a_two_node_pipeline(rt: Path) -> None:
    async with two_nodes(rt) as (alpha, _beta):
        tap = await started_tap(rt, "--all", "echo", "--json")
        try:
            await asyncio.wait_for(subscribed_cli(tap, alpha), WAIT_S)
            ran = await dpipes(rt, "--node", alpha.host_port, "cat | sort@beta | cat", input=b"b\na\n")
            assert ran.stdout == b"a\nb\n", ran.stderr
            lines = await read_lines_until(tap, lambda ls: all_exited(stage_events(ls), 3))
        finally:
            _out, err = await stop(tap)
    events = stage_events(lines)
    run = next(e for e in events if e.get("method") == "run" and e["kind"] == "REQUEST")
    assert run["body"]["pipeline"] == "cat | sort@beta | cat" and run["body"]["mode"] == "bytes"
    reply = next(e for e in events if e.get("method") == "run" and e["kind"] == "REPLY")
    pid = reply["body"]["pipeline"]
    assert [(s["index"], s["node"]) for s in reply["body"]["stages"]] == [(0, "alpha"), (1, "beta"), (2, "alpha")]
    client = run["src"]
    data = [e for e in events if e["kind"] == "BYTES"]
    assert sorted((e["src"], e["dst"], e["text"]) for e in data) == sorted(
        [
            (client, f"alpha/{pid}.0", "b\na\n"),
            (f"alpha/{pid}.0", f"beta/{pid}.1", "b\na\n"),
            (f"beta/{pid}.1", f"alpha/{pid}.2", "a\nb\n"),
            (f"alpha/{pid}.2", client, "a\nb\n"),
        ]
    )
    assert all(e["node"] == e["src"].partition("/")[0] for e in data)  # each message once, at its source's hub
    eofs = [e for e in events if e["kind"] == "EOF"]
    assert {e["total"] for e in eofs} == {4}
    exits = [
        e["body"] for e in events if e.get("method") == "exit" and e["kind"] == "REQUEST" and e["dst"].endswith("/ctl")
    ]
    assert sorted((x["stage"], x["code"], x["status"]) for x in exits) == [(i, 0, "exit 0") for i in range(3)]
    assert "dropped" not in err


async def test_echo_selects_fields_filters_counts_and_shows_objects(rt: Path) -> None:
    async with two_nodes(rt) as (alpha, _beta):
        targets = await resolve("alpha", all=True, runtime=rt)
        assert {t.node for t in targets} == {"alpha", "beta"}
        async with TapSource(targets) as source:
            await tap_sees_traffic(source, alpha)
            select = verbs.Selection((), verbs.Filter("kind == 'OBJECTS'"))
            shown = asyncio.create_task(
                collect(verbs.echo(source, select, fields=("objects.0.n", "count", "size")), lambda got: len(got) == 1)
            )
            ran = await dpipes(rt, "--node", alpha.host_port, "--json", "cat | cat@beta", input=b'{"n": 7}\n')
            assert ran.code == 0, ran.stderr
            assert json.loads(ran.stdout)["n"] == 7
            (out,) = await shown
    n, count, size = out.text.split("\t")
    assert (n, count) == ("7", "1") and int(size) > 0


async def test_echo_once_prints_one_event_and_exits(rt: Path) -> None:
    async with two_nodes(rt) as (alpha, _beta):
        tap = await started_tap(rt, "--node", "beta", "echo", "--once", "beta/")
        while tap.returncode is None:
            await known_nodes(alpha.tcp)  # `info` calls, and gossip to beta, make traffic
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tap.wait(), 0.5)
        out, err = await stop(tap)
    assert tap.returncode == 0, err
    assert len(out.splitlines()) == 1 and "beta/" in out


# -- pipes -----------------------------------------------------------------------------------


async def test_pipes_shows_what_a_remote_stage_reports(rt: Path, tmp_path: Path) -> None:
    program = tmp_path / "reporter.py"
    program.write_text(PIPES_PROGRAM)
    async with two_nodes(rt) as (alpha, _beta):
        targets = await resolve(None, all=True, runtime=rt)
        async with TapSource(targets) as source, TapSource(targets) as second:
            await tap_sees_traffic(source, alpha)
            await tap_sees_traffic(second, alpha)
            shown = asyncio.create_task(
                collect(verbs.pipes(source), lambda got: any("materialized" in o.text for o in got))
            )
            warnings = asyncio.create_task(collect(verbs.pipes(second, level="warning"), lambda got: len(got) >= 1))
            ran = await dpipes(rt, "--node", alpha.host_port, f"python3@beta {program}")
            assert ran.code == 0, ran.stderr
            lines = [o.text for o in await shown]
            warned = [o.text for o in await warnings]
    assert any(re.search(r"stage 0@beta: log INFO: hello from the stage$", line) for line in lines), lines
    assert any(line.endswith("materialized orders") for line in lines)
    assert "careful" in warned[0] and not any("hello" in w for w in warned)


# -- hz, bw, list, top -----------------------------------------------------------------------


def next_report_after_done(got: list[verbs.Out]) -> int | None:
    """Where the report after the first complete one that shows a finished pipeline starts."""
    done = next((i for i, o in enumerate(got) if "(done)" in o.text), None)
    if done is None:
        return None
    return next((i for i in range(done, len(got)) if got[i].text.startswith("-- ")), None)


async def test_hz_bw_and_list_report_a_running_pipeline(rt: Path) -> None:
    async with two_nodes(rt) as (alpha, _beta):
        targets = await resolve(None, all=True, runtime=rt)
        async with TapSource(targets) as one, TapSource(targets) as two, TapSource(targets) as three:
            for source in (one, two, three):
                await tap_sees_traffic(source, alpha)
            hz_line = re.compile(r"^beta/: average rate: [\d.]+ msgs/s .* window: (\d+)$")
            bw_line = re.compile(r"^beta/: average: [\d.]+ \S+/s  mean: .* window: (\d+)$")
            hz = asyncio.create_task(
                collect(
                    verbs.rates(one, ["beta/"], bandwidth=False, window=100),
                    lambda got: any((m := hz_line.match(o.text)) and int(m[1]) >= 2 for o in got),
                )
            )
            bw = asyncio.create_task(
                collect(
                    verbs.rates(two, ["beta/"], bandwidth=True, window=100),
                    lambda got: any((m := bw_line.match(o.text)) and int(m[1]) >= 2 for o in got),
                )
            )
            listed = asyncio.create_task(
                collect(verbs.listing(three), lambda got: next_report_after_done(got) is not None)
            )
            ran = await dpipes(rt, "--node", alpha.host_port, "seq 1 300000 | cat@beta | wc -l")
            assert ran.stdout.strip() == b"300000", ran.stderr
            await hz
            await bw
            report = [o.text for o in await listed]
    end = next_report_after_done([verbs.Out(t) for t in report])
    start = max(i for i, t in enumerate(report[:end]) if t.startswith("-- "))
    last = report[start:end]
    assert re.search(r"pipeline \w+ \(done\): seq 1 300000 \| cat@beta \| wc -l \[bytes\]", last[1]), last
    assert any(re.fullmatch(r"  stage 1 cat@beta  exit 0", t) for t in last), last
    edge = next(t for t in last if " -> " in t and "BYTES" in t)
    assert re.search(r"BYTES: \d+ msgs 1.9 MiB, .*eof$", edge), edge  # 1,988,895 bytes of seq's output


async def test_top_without_a_terminal_prints_the_view_as_lines(rt: Path) -> None:
    async with two_nodes(rt) as (alpha, _beta):
        tap = await started_tap(rt, "--all", "top")
        try:
            await read_lines_until(tap, lambda ls: any(line.startswith("node ") for line in ls))
            ran = await dpipes(rt, "--node", alpha.host_port, "echo hi | sh@beta -c 'cat; exit 3'")
            assert ran.stdout == b"hi\n"
            lines = await read_lines_until(tap, lambda ls: any("exit 3" in line and "error" in line for line in ls))
        finally:
            await stop(tap)
    assert any(re.match(r"  stage 1 sh -c cat; exit 3@beta  exit 3", line) for line in lines), lines


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
async def test_top_in_a_terminal_shows_rates_and_a_stage_error_and_quits_on_q(rt: Path, tmp_path: Path) -> None:
    session = "top"
    server = f"dpipes-tap-test-{os.getpid()}"  # a tmux server of its own: no one else's sessions or environment
    env = environment(rt)
    command = f"env DPIPES_RUNTIME_DIR={rt} DPIPES_CONFIG_PATHS= {sys.executable} -m dpipes.tools.tap --all top"

    def tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", server, *args], env=env, check=check, capture_output=True, text=True)

    async def screen_shows(pattern: str) -> str:
        async def poll() -> str:
            while True:
                screen = tmux("capture-pane", "-p", "-t", session).stdout
                if re.search(pattern, screen):
                    return screen
                await known_nodes(alpha.tcp)  # keep events flowing so the view updates
                await asyncio.sleep(0.1)

        return await asyncio.wait_for(poll(), WAIT_S)

    async with two_nodes(rt) as (alpha, _beta):
        tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "60", command)
        try:
            await screen_shows(r"dpipes-tap top")
            await screen_shows(r"alpha")
            ran = await dpipes(rt, "--node", alpha.host_port, "seq 1 200000 | sh@beta -c 'cat >/dev/null; exit 4'")
            assert ran.code == 4
            screen = await screen_shows(r"stage 1@beta: exit 4")  # the error list names the stage
            assert re.search(r"BYTES .*MiB", screen), screen  # an edge with its bytes
            tmux("send-keys", "-t", session, "q")

            async def gone() -> None:
                while tmux("has-session", "-t", session, check=False).returncode == 0:
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(gone(), WAIT_S)
        finally:
            tmux("kill-server", check=False)


# -- record, replay, info --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bus.arrow", "bus.parquet"])
async def test_record_then_replay_reproduces_the_decoded_messages_in_order(rt: Path, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    async with two_nodes(rt) as (alpha, _beta):
        # One hub's tap: its events reach both readers in one order (two hubs' events may interleave
        # differently at two readers).
        live = await started_tap(rt, "--node", "alpha", "echo", "--json")
        recorder = await started_tap(rt, "--node", "alpha", "record", str(path))
        try:
            await asyncio.wait_for(subscribed_cli(live, alpha), WAIT_S)
            await asyncio.wait_for(recording(recorder, alpha), WAIT_S)
            ran = await dpipes(rt, "--node", alpha.host_port, "seq 1 50000 | sort@beta -r | head -3")
            assert ran.stdout == b"9999\n9998\n9997\n", ran.stderr
            lines = await read_lines_until(live, lambda ls: all_exited(stage_events(ls), 2))
        finally:
            await stop(live)
            _out, err = await stop(recorder)
    assert recorder.returncode == 0, err
    replay, _err = await finished(await started_tap(rt, "replay", "--rate", "0", "--json", str(path)))
    live_events = stage_events(lines)
    replayed = [json.loads(line) for line in replay.splitlines() if line.startswith("{")]
    common = {e["n"] for e in live_events} & {e["n"] for e in replayed}  # each reader started at its time
    pid = next(e["body"]["pipeline"] for e in live_events if e.get("method") == "run" and e["kind"] == "REPLY")
    assert any(e["kind"] == "BYTES" and pid in e["src"] and e["n"] in common for e in replayed), (
        pid,
        [(e["n"], e["kind"], e["src"]) for e in replayed][-30:],
        sorted(common)[-20:],
        _err,
    )  # the run is in both
    assert [e for e in replayed if e["n"] in common] == [e for e in live_events if e["n"] in common]
    info, _ = await finished(await started_tap(rt, "info", "--json", str(path)))
    summary = json.loads(info)
    assert summary["events"] == len(replayed) and summary["dropped"] == 0
    sent = len(b"".join(b"%d\n" % i for i in range(1, 50001)))
    assert summary["edges"][f"alpha/{pid}.0 -> beta/{pid}.1"]["bytes"] == sent


# -- nodes -----------------------------------------------------------------------------------


async def test_nodes_lists_both_nodes_and_their_taps(rt: Path) -> None:
    async with two_nodes(rt):
        out, err = await finished(await started_tap(rt, "nodes", "--json"))
    rows = {r["name"]: r for r in map(json.loads, out.splitlines())}
    assert set(rows) == {"alpha", "beta"}, err
    assert rows["beta"]["tap"] == f"ipc://{rt}/beta-tap.sock" and rows["alpha"]["source"] == "self"


# -- losses and leaving ----------------------------------------------------------------------


async def test_a_slow_tap_loses_counted_events_and_never_changes_the_output(rt: Path) -> None:
    async with two_nodes(rt) as (alpha, _beta):
        async with TapSource([Target("alpha", f"ipc://{rt}/local-tap.sock")], hwm=10) as source:
            await tap_sees_traffic(source, alpha)
            # The tap reads nothing while 500 MB cross the bus: thousands of events for queues of
            # TAP_HWM at the hub and 10 here.
            ran = await dpipes(rt, "--node", alpha.host_port, "head -c 500000000 /dev/zero | cat@beta | wc -c")
            assert ran.stdout.strip() == b"500000000", ran.stderr
            received_before = source.received
            first = last = None

            async def until_a_gap() -> None:
                nonlocal first, last
                while source.dropped == 0 or last is None:
                    await known_nodes(alpha.tcp)
                    while (event := await source.next(0.2)) is not None:
                        first = event.n if first is None else first
                        last = event.n

            await asyncio.wait_for(until_a_gap(), WAIT_S)
    assert source.dropped > 0
    assert first is not None and last is not None
    assert source.received - received_before + source.dropped == last - first + 1  # every event counted


async def test_a_tap_killed_mid_run_leaves_nothing_behind(rt: Path) -> None:
    async with two_nodes(rt) as (alpha, beta):
        tap = await started_tap(rt, "--all", "echo")
        await asyncio.wait_for(subscribed_cli(tap, alpha), WAIT_S)
        files = sorted(os.listdir(rt))
        pipeline = "head -c 300000000 /dev/zero | cat@beta | wc -c"
        run = asyncio.create_task(dpipes(rt, "--node", alpha.host_port, pipeline))
        await read_lines_until(tap, lambda ls: any(" BYTES " in line for line in ls))
        tap.kill()
        await tap.wait()
        ran = await run
        assert ran.stdout.strip() == b"300000000", ran.stderr
        assert children_of(tap.pid) == []
        assert sorted(os.listdir(rt)) == files
        assert alpha.proc.returncode is None and beta.proc.returncode is None
        async with TapSource(await resolve(None, runtime=rt)) as source:  # a new tap works as the first did
            await tap_sees_traffic(source, alpha)


def recorded_bytes(path: Path, seqs: list[int], missed: dict[int, int] | None = None) -> list[Any]:
    """Tap events of BYTES from a/p.0 to b/p.1 with these sequence numbers, recorded to ``path``
    (``missed``: how many events the recorder had missed before event n); the events."""
    from dpipes.bus import codec, tap
    from dpipes.nodes.tap.record import Recorder
    from dpipes.nodes.tap.view import Decoder

    events = []
    for n in seqs:
        msg = codec.Bytes(src="a/p.0", dst="b/p.1", sid=1, seq=n, frames=(b"line %d\n" % n,))
        frames = codec.encode(msg)
        events.append(tap.decode_event(tap.encode_event("a", n, codec.decode_header(frames[0]), frames[1:], now=n)))
    decoder = Decoder()
    with Recorder(path, recorder={}) as rec:
        for event in events:
            rec.add(event, decoder.decode(event), (missed or {}).get(event.n, 0))
    return events


async def test_a_replay_served_as_a_tap_reads_as_the_recording(rt: Path, tmp_path: Path) -> None:
    from dpipes.nodes.tap.view import Decoder

    path, endpoint = tmp_path / "r.arrow", f"ipc://{tmp_path}/replay.sock"
    events = recorded_bytes(path, [0, 1, 2, 3, 4, 6, 7], missed={6: 1})  # event 5 was missed when this was recorded
    server = await started_tap(rt, "replay", str(path), "--publish", endpoint, "--rate", "0")
    reader = await started_tap(rt, "--endpoint", endpoint, "echo", "--json", "--count", str(len(events)))
    out, err = await finished(reader)
    await finished(server)
    decoder = Decoder()
    assert [json.loads(line) for line in out.splitlines()] == [decoder.decode(e) for e in events]
    assert json.loads(err.splitlines()[0]) == {"dropped": 1, "dropped_total": 1}


def replays(lines: list[str]) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, lines) if e.get("replay")]


async def test_a_replay_to_a_node_reaches_the_readers_of_its_tap(rt: Path, tmp_path: Path) -> None:
    from dpipes.nodes.tap.view import Decoder

    path = tmp_path / "r.arrow"
    events = recorded_bytes(path, list(range(5)))
    async with two_nodes(rt) as (_alpha, beta):
        reader = await started_tap(rt, "--node", "beta", "echo", "--json")
        try:
            await asyncio.wait_for(subscribed_cli(reader, beta), WAIT_S)
            await finished(await started_tap(rt, "replay", str(path), "--to", "beta", "--rate", "0"))
            lines = await read_lines_until(reader, lambda ls: len(replays(ls)) == len(events))
        finally:
            await stop(reader)
    decoder = Decoder()
    assert replays(lines) == [{**decoder.decode(e), "replay": True} for e in events]  # in order, as recorded
