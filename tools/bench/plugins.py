"""Plugin benchmarks (``dpipes-bench plugins``): plugin stages against what a user would use instead.

* ``plugins.cross_node_arrow_<N>MiB``: an Arrow IPC stream through ``cat@bench-a FILE |
  %bench_pass@bench-b | cat@bench-a`` (``--arrow``; stages on two local daemons, run through
  bench-a as this host's daemon, so the last ``cat`` writes to our stdout), against the same
  table through pyarrow.flight ``do_put`` then ``do_get`` over loopback (a Flight server in another
  process). MB/s of the IPC stream; dpipes' figure includes starting the pipeline (three forks,
  two of them Python workers). Target (issue 10): at least 1x. The pipeline's output is read
  as Flight's ``do_get`` reads its own, as an Arrow consumer would: pyarrow's IPC reader on the
  pipe (of ``PIPE_BUFFER_BYTES``), batch by batch, rows counted. Collecting it with
  ``subprocess``'s ``communicate`` instead (32 KiB reads into a list, joined at the end) cost this
  process 0.14-0.4 CPU-s per 205 MiB and capped any pipeline at 450-780 MB/s here (measured with
  ``cat FILE`` alone), a ceiling of the harness that Flight's side never had. After each dpipes run
  the suite waits until bench-b's worker pool has refilled, so that the refill (0.3-0.8 CPU-s)
  slows neither the Flight run that follows nor the next dpipes run.
* ``plugins.cross_node_arrow_cpu``: the CPU seconds per GB of the same runs, user + system, lower
  is better: for dpipes the client, both daemons, their stages and the plugin worker (less what
  that worker spent before the run, started ahead of need: its imports are not the run's; read
  once that worker has been reaped, as it may finish its stage after the client has ended); for
  Flight this process (the client) and the server's process. On a machine shared with other work
  this varies less than the MB/s above, which follow how much of the machine the run was given.
* ``plugins.same_host_program_to_plugin_<N>MiB``: ``cat FILE | %bench_sink`` on this host's daemon
  (no ``--node``: over ipc, as a user on this host runs it), against
  ``sh -c 'cat FILE | python3 -c READER'``: a plain Unix pipe carrying the Arrow IPC stream into
  a second Python process that reads every batch. Target: at least 1.5x.
* ``plugins.batches_per_s``: 10k batches of 100 rows through a pass-through plugin
  (``%bench_source | %bench_pass | %bench_sink``, this host's daemon), against the same batches
  written by one Python process to another through a Unix pipe as an Arrow IPC stream. Batches/s,
  start included on both sides.
* ``plugins.pass_through_us_per_batch``: CPU time of a pass-through plugin's thread per 100-row
  batch, in this process, with the worker's own parts for direct edges (an Arrow IPC stream read
  from one kernel pipe, the plugin run by the engine, its output written to another pipe), against
  the same stream read and written by pyarrow alone on one thread (``open_stream`` on one pipe,
  ``new_stream`` on the other), as a Python filter between two pipes would. No daemons, no
  starts, no other process on the clock: the engine's own cost per batch, the least noisy
  figure of the suite on a busy machine. Lower is better.
* ``plugins.stage_starts_per_s``: whole runs of ``cat /dev/null | %bench_sink`` per second on a
  node that keeps plugin workers started ahead of need (``[limits] plugin_workers_ready``, the
  default), against the same on a node that forks each stage's worker (``plugin_workers_ready =
  0``), runs interleaved: what the pool saves a short plugin stage.

After each dpipes run of the same-host and batches rows, the suite waits until the daemon's worker
pool has refilled (its workers started ahead of need have done their imports and wait, named
``dpipes-ready``) before the next measurement: a refill costs 0.3-0.8 CPU-s, which would
otherwise slow the baseline run that follows, not dpipes'.

Commands run as an installed package runs them, with their byte code cached (as in
:mod:`dpipes.tools.bench.pipe`): ``PYTHONDONTWRITEBYTECODE`` is removed from their environment,
else every ``dpipes`` start compiles its modules again while the baseline's pyarrow is cached.

The three plugins are the suite's own (written with a ``dpipes.plugins`` entry point into a
temporary directory the daemons import from), so the suite needs nothing installed but dpipes.
Each row says delivered/sent: the rows the last stage counted against the rows written.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dpipes.tools.bench.pipe import local_daemons
from dpipes.tools.bench.result import Result, result

BATCHES = 10_000  # the per-batch figure: 10k batches of 100 rows
BATCH_ROWS = 100
FLIGHT_START_TIMEOUT_S = 30.0
POOL_REFILL_TIMEOUT_S = 60.0  # a daemon's worker pool refilled after a run (busy hosts are slow)
POOL_POLL_S = 0.02
READY_WORKER = b"dpipes-ready"  # a plugin worker started ahead of need, its imports done (nodes.worker_pool)
TAKEN_WORKER = b"dpipes-worker"  # one running a stage
REAP_TIMEOUT_S = 30.0  # a plugin worker taken by a run reaped after the run (busy hosts are slow)
SNAPSHOT_TRIES = 100  # reads of the daemons' CPU until no child was reaped during one
PIPE_BUFFER_BYTES = 1 << 20  # the cross-node row's output pipe, as a node sizes a stage's pipes
_F_SETPIPE_SZ = 1031  # <linux/fcntl.h>

PLUGINS_SOURCE = '''\
"""dpipes-bench's own plugins: a pass-through, a sink that counts, a source of small batches."""
import pyarrow as pa
from dpipes.nodes.plugins import Plugin

SCHEMA = pa.schema([("n", pa.int64()), ("x", pa.float64())])


class Pass(Plugin):
    def on_record_batch(self, batch, anchor):
        self.provider.write_to_anchor("Output", batch)

    def on_incoming_connection_complete(self, anchor):
        pass

    def on_complete(self):
        pass


class Sink(Plugin):
    def __init__(self, provider):
        super().__init__(provider)
        self.rows = 0

    def on_record_batch(self, batch, anchor):
        self.rows += batch.num_rows

    def on_incoming_connection_complete(self, anchor):
        pass

    def on_complete(self):
        self.provider.write_to_anchor("Output", pa.table({"rows": [self.rows]}))


class Source(Plugin):
    def __init__(self, provider):
        super().__init__(provider)
        self.batches = int(provider.tool_config.get("batches", 10000))
        self.rows = int(provider.tool_config.get("rows", 100))

    def on_record_batch(self, batch, anchor):
        pass

    def on_incoming_connection_complete(self, anchor):
        pass

    def on_complete(self):
        n = pa.array(range(self.rows), pa.int64())
        batch = pa.record_batch([n, pa.array([0.5] * self.rows)], schema=SCHEMA)
        for _ in range(self.batches):
            self.provider.write_to_anchor("Output", batch)
'''

READER = "import sys, pyarrow.ipc as i; r = i.open_stream(sys.stdin.buffer); print(sum(b.num_rows for b in r))"
WRITER = textwrap.dedent(f"""\
    import sys, pyarrow as pa, pyarrow.ipc as i
    n = pa.array(range({BATCH_ROWS}), pa.int64())
    b = pa.record_batch([n, pa.array([0.5] * {BATCH_ROWS})], names=["n", "x"])
    with i.new_stream(sys.stdout.buffer, b.schema) as w:
        for _ in range({BATCHES}):
            w.write_batch(b)
    """)


def _install_plugins(site: Path) -> None:
    """The suite's plugins as pip would leave them: a module and a dist-info with entry points."""
    site.mkdir()
    (site / "dpipes_bench_plugins.py").write_text(PLUGINS_SOURCE)
    dist = site / "dpipes_bench_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dpipes-bench-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[dpipes.plugins]\n"
        "bench_pass = dpipes_bench_plugins:Pass\n"
        "bench_sink = dpipes_bench_plugins:Sink\n"
        "bench_source = dpipes_bench_plugins:Source\n"
    )


def _table(rows: int) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "n": pa.array(range(rows), pa.int64()),
            "x": pa.array([i * 0.5 for i in range(rows)], pa.float64()),
            "s": pa.array([f"row {i % 1000}" for i in range(rows)], pa.string()),
        }
    )


def _write_stream(table: Any, path: Path, batch_rows: int) -> int:
    import pyarrow.ipc as ipc

    with open(path, "wb") as f, ipc.new_stream(f, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return path.stat().st_size


def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, bytes]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return time.perf_counter() - start, done.stdout


def _rows_of(stdout: bytes) -> int:
    """The row count a sink or a reader printed (CSV ``rows\\nN``, or ``N``)."""
    words = stdout.split()
    return int(words[-1]) if words and words[-1].isdigit() else 0


def _sink_rows(stdout: bytes) -> int:
    """The count the sink plugin wrote, as an Arrow IPC stream (``--arrow``) of one row."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        table = ipc.open_stream(pa.BufferReader(stdout)).read_all()
    except pa.ArrowInvalid:
        return 0
    return int(table.column("rows")[0].as_py()) if table.num_rows else 0


def _proc_cpu(pid: int, *, reaped: bool = True) -> float:
    """User + system CPU seconds of process ``pid`` so far, with its children it has reaped unless
    not ``reaped``; Linux ``/proc``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return sum(int(v) for v in fields[11 : 15 if reaped else 13]) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> set[int]:
    """The children of ``pid`` (of each of its threads), those not yet reaped included."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            out.update(int(child) for child in (task / "children").read_text().split())
    return out


def _children_cpu(pid: int) -> dict[int, float]:
    """Each child of ``pid`` and the CPU seconds it has used so far (itself only)."""
    out: dict[int, float] = {}
    for child in _children(pid):
        with contextlib.suppress(OSError, ValueError):  # a child that ended meanwhile
            out[child] = _proc_cpu(child, reaped=False)
    return out


class _RunCpu:
    """CPU seconds that a run through the daemons ``pids`` costs: ours (the client, reaped) and
    theirs (with the stages they reaped), less what the children they reaped during the run had
    spent before it (a plugin worker started ahead of need, its imports done)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.start = usage.ru_utime + usage.ru_stime + sum(_proc_cpu(p) for p in pids)
        self.before = {child: cpu for p in pids for child, cpu in _children_cpu(p).items()}

    def seconds(self) -> float:
        """The run's CPU seconds, once the workers it took (started before it) have been reaped.

        Raises:
            TimeoutError: a taken worker still runs after ``REAP_TIMEOUT_S``.
        """
        # A worker taken by the run may end after the client has: its CPU counts once reaped.
        deadline = time.monotonic() + REAP_TIMEOUT_S
        while taken := [child for child in self.before.keys() & self._alive() if _comm(child) == TAKEN_WORKER]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"plugin workers {taken} still run {REAP_TIMEOUT_S:g} s after the run ended")
            time.sleep(POOL_POLL_S)
        # A child reaped between reading the totals and listing who is alive would be taken off
        # without being in the totals (the figure went negative once), so the totals are read
        # between two listings that agree: then a child not listed was reaped before the read.
        for _ in range(SNAPSHOT_TRIES):
            alive = self._alive()
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            now = usage.ru_utime + usage.ru_stime + sum(_proc_cpu(p) for p in self.pids)
            if self._alive() == alive:
                break
        else:
            raise RuntimeError(f"the daemons' children kept changing over {SNAPSHOT_TRIES} reads of their CPU")
        ahead = sum(cpu for child, cpu in self.before.items() if child not in alive)
        return now - self.start - ahead

    def _alive(self) -> set[int]:
        return {child for p in self.pids for child in _children(p)}


def _run_reading_ipc(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run ``argv`` reading its stdout as an Arrow IPC stream as it comes: wall seconds, rows read
    (0 if it was not one, or ``argv`` failed)."""
    import fcntl

    import pyarrow as pa
    import pyarrow.ipc as ipc

    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    with proc.stdout:
        with contextlib.suppress(OSError):  # a smaller pipe only slows the run down
            fcntl.fcntl(proc.stdout.fileno(), _F_SETPIPE_SZ, PIPE_BUFFER_BYTES)
        try:
            rows = sum(batch.num_rows for batch in ipc.open_stream(proc.stdout))
        except pa.ArrowInvalid:
            rows = 0
    status = proc.wait()
    return time.perf_counter() - start, rows if status == 0 else 0


def _ready_workers(daemon_pid: int) -> int:
    """How many of a daemon's children are plugin workers started ahead of need, imports done."""
    return sum(_comm(child) == READY_WORKER for child in _children(daemon_pid))


def _comm(pid: int) -> bytes:
    """What ``ps -o comm`` shows for process ``pid`` (empty once it has been reaped)."""
    try:
        return Path(f"/proc/{pid}/comm").read_bytes().strip()
    except OSError:  # it ended meanwhile
        return b""


def _await_pool(runtime: Path, node: str) -> None:
    """Until ``node``'s worker pool is full again (its default size), so that its refill runs under
    no measurement.

    Raises:
        TimeoutError: not within ``POOL_REFILL_TIMEOUT_S``.
    """
    from dpipes.nodes.config import Limits

    pid = int((runtime / f"{node}.pid").read_text())
    deadline = time.monotonic() + POOL_REFILL_TIMEOUT_S
    while _ready_workers(pid) < Limits().plugin_workers_ready:
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node}'s plugin worker pool did not refill in {POOL_REFILL_TIMEOUT_S:g} s")
        time.sleep(POOL_POLL_S)


def _pass_through_thread_cpu(batches: int, *, engine: bool) -> tuple[float, int]:
    """Thread CPU seconds of a pass-through between two pipes (first batch to end), and the rows out.

    ``engine``: the plugin worker's parts (DirectInput, PluginRunner, DirectOutput); else pyarrow
    alone on one thread. The feeding and draining threads are not on the clock.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from dpipes.nodes.plugins.api import Environment, Plugin
    from dpipes.nodes.plugins.direct import DirectInput, DirectOutput, HeldWrites
    from dpipes.nodes.plugins.runner import PluginRunner
    from dpipes.nodes.plugins.transport import MemoryMessageChannel, Transport

    n = pa.array(range(BATCH_ROWS), pa.int64())
    batch = pa.record_batch([n, pa.array([0.5] * BATCH_ROWS)], names=["n", "x"])
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, batch.schema) as writer:
        for _ in range(batches):
            writer.write_batch(batch)
    stream = sink.getvalue()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    rows: list[int] = []
    clock: list[float] = []

    def feed() -> None:
        with open(in_w, "wb") as f:
            f.write(stream)

    def drain() -> None:
        with open(out_r, "rb") as f:
            rows.append(sum(b.num_rows for b in ipc.open_stream(f)))

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
    for thread in threads:
        thread.start()
    if engine:
        held = HeldWrites()  # as the worker wires a direct input and output
        out = DirectOutput(out_w, "batches", where="bench", gone=BrokenPipeError, held=held)

        class Pass(Plugin):
            def on_record_batch(self, table: Any, anchor: Any) -> None:
                if not clock:
                    clock.append(time.thread_time())
                self.provider.write_to_anchor("Output", table)

            def on_incoming_connection_complete(self, anchor: Any) -> None:
                clock.append(time.thread_time())

            def on_complete(self) -> None:
                pass

        class Pipe(Transport):
            def open_anchor(self, name: str, schema: Any) -> None:
                out.open(schema)

            def write(self, name: str, batch: Any) -> None:
                out.write(batch)

            def close_anchor(self, name: str) -> None:
                out.close()

        env = Environment(pipeline="bench", stage=1, node="bench", plugin="pass", temp_dir=Path(tempfile.gettempdir()))
        with PluginRunner(
            Pass,
            incoming=["Input"],
            outgoing=["Output"],
            environment=env,
            transport=Pipe(),
            channel=MemoryMessageChannel(),
            callback_timeout_s=None,
        ) as runner:
            runner.start()  # as the worker feeds its only input: pulled on the plugin's thread
            runner.feed("Input", DirectInput(in_r, "batches", where="bench", held=held).batches())
            runner.complete()
    else:
        with open(in_r, "rb") as f_in, open(out_w, "wb") as f_out:
            with ipc.open_stream(f_in) as reader, ipc.new_stream(f_out, reader.schema) as writer:
                for got in reader:
                    if not clock:
                        clock.append(time.thread_time())
                    writer.write_batch(got)
            clock.append(time.thread_time())
    for thread in threads:
        thread.join()
    return clock[-1] - clock[0], rows[0] if rows else 0


@contextlib.contextmanager
def _flight_server() -> Iterator[tuple[str, int]]:
    """A pyarrow.flight server in a process of its own that keeps what is put and serves it back."""
    code = textwrap.dedent("""\
        import sys, pyarrow.flight as flight
        class Server(flight.FlightServerBase):
            def __init__(self):
                super().__init__("grpc://127.0.0.1:0")
                self.tables = {}
            def do_put(self, context, descriptor, reader, writer):
                self.tables[descriptor.path[0]] = reader.read_all()
            def do_get(self, context, ticket):
                return flight.RecordBatchStream(self.tables[ticket.ticket])
        server = Server()
        print(f"grpc://127.0.0.1:{server.port}", flush=True)
        server.serve()
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip(), proc.pid
    finally:
        proc.terminate()
        proc.wait(FLIGHT_START_TIMEOUT_S)


def _flight_put_get(addr: str, table: Any) -> tuple[float, int]:
    import pyarrow.flight as flight

    client = flight.connect(addr)
    try:
        start = time.perf_counter()
        writer, _ = client.do_put(flight.FlightDescriptor.for_path(b"t"), table.schema)
        writer.write_table(table)
        writer.close()
        got = client.do_get(flight.Ticket(b"t")).read_all()
        return time.perf_counter() - start, got.num_rows
    finally:
        client.close()


def plugins_benchmarks(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] = lambda s: None
) -> list[Result]:
    rows = (1 if quick else 8) * 1_000_000
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="dpipes-bench-") as tmp:
        site = Path(tmp) / "site"
        _install_plugins(site)
        table = _table(rows)
        data = Path(tmp) / "table.arrows"
        size = _write_stream(table, data, 64 * 1024)
        runtime = Path(tmp) / "run"
        runtime.mkdir(mode=0o700)
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, DPIPES_RUNTIME_DIR=str(runtime), DPIPES_CONFIG_PATHS="", PYTHONPATH=path)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: the warm-up run writes a checkout's cache
        dpipes = [sys.executable, "-m", "dpipes.tools.dpipes", "--insecure"]  # local_daemons run --insecure
        mib = size >> 20
        daemons: list[int] = []
        with (
            local_daemons(["bench-a", "bench-b"], runtime, env=env, pids=daemons) as (a, _b),
            _flight_server() as (flight_addr, flight_pid),
        ):
            # From node A's host, through its daemon (bench-a, the first, is this host's local one), as
            # a user there runs it: the last stage writes to our stdout itself (the descriptor is
            # handed over), where a --node over TCP would have it read back through the client.
            cross = [*dpipes, "--arrow", f"cat@bench-a {data} | %bench_pass@bench-b | cat@bench-a"]
            _run(cross, env)  # warm the page cache and the daemons' imports
            _flight_put_get(flight_addr, table)
            ours, theirs, got, their_got = [], [], 0, 0
            our_cpu: list[float] = []
            their_cpu: list[float] = []
            for _ in range(repeat):
                _await_pool(runtime, "bench-b")
                cpu = resource.getrusage(resource.RUSAGE_SELF)
                flight_cpu = _proc_cpu(flight_pid)
                seconds, moved = _flight_put_get(flight_addr, table)
                after = resource.getrusage(resource.RUSAGE_SELF)
                client = after.ru_utime - cpu.ru_utime + after.ru_stime - cpu.ru_stime
                their_cpu.append((client + _proc_cpu(flight_pid) - flight_cpu) / (size / 1e9))
                theirs.append(size / seconds / 1e6)
                their_got += moved
                run_cpu = _RunCpu(daemons)
                seconds, moved = _run_reading_ipc(cross, env)
                our_cpu.append(run_cpu.seconds() / (size / 1e9))
                ours.append(size / seconds / 1e6)
                got += moved
                progress(".")
            results.append(
                result(
                    f"plugins.cross_node_arrow_{mib}MiB",
                    "MB/s",
                    ours,
                    "pyarrow.flight do_put + do_get",
                    theirs,
                    target=1.0,
                    delivered=(got, rows * repeat),
                    baseline_delivered=(their_got, rows * repeat),
                )
            )
            results.append(
                result(
                    "plugins.cross_node_arrow_cpu",
                    "CPU s/GB",
                    our_cpu,
                    "pyarrow.flight do_put + do_get (client and server)",
                    their_cpu,
                    higher_is_better=False,
                    delivered=(got, rows * repeat),
                    baseline_delivered=(their_got, rows * repeat),
                )
            )
            # Through this host's daemon, as for the row above: a --node over TCP would take the
            # client's long path and read the sink's output back through it.
            sink = [*dpipes, "--arrow", f"cat {data} | %bench_sink@bench-a"]
            _run(sink, env)  # warm: bench-a's worker pool fills once a plugin stage ran there
            _await_pool(runtime, "bench-a")
            ours, theirs, got, their_got = [], [], 0, 0
            for _ in range(repeat):
                seconds, out = _run(["sh", "-c", f"cat {data} | {sys.executable} -c '{READER}'"])
                theirs.append(size / seconds / 1e6)
                their_got += _rows_of(out)
                seconds, out = _run(sink, env)
                ours.append(size / seconds / 1e6)
                got += _sink_rows(out)
                _await_pool(runtime, "bench-a")
                progress(".")
            results.append(
                result(
                    f"plugins.same_host_program_to_plugin_{mib}MiB",
                    "MB/s",
                    ours,
                    "sh: cat FILE | python3 (IPC reader)",
                    theirs,
                    target=1.5,
                    delivered=(got, rows * repeat),
                    baseline_delivered=(their_got, rows * repeat),
                )
            )
            batches = BATCHES // 10 if quick else BATCHES
            chain = (
                f"%bench_source@bench-a batches={batches} rows={BATCH_ROWS} | %bench_pass@bench-a | %bench_sink@bench-a"
            )
            writer = WRITER.replace(f"range({BATCHES})", f"range({batches})")
            ours, theirs, got, their_got = [], [], 0, 0
            for _ in range(repeat):
                seconds, out = _run(["sh", "-c", f"{sys.executable} -c '{writer}' | {sys.executable} -c '{READER}'"])
                theirs.append(batches / seconds)
                their_got += _rows_of(out)
                seconds, out = _run([*dpipes, chain], env)
                ours.append(batches / seconds)
                got += _rows_of(out)
                _await_pool(runtime, "bench-a")
                progress(".")
            results.append(
                result(
                    "plugins.batches_per_s",
                    "batches/s",
                    ours,
                    "sh: python3 (IPC writer) | python3 (IPC reader)",
                    theirs,
                    delivered=(got, batches * BATCH_ROWS * repeat),
                    baseline_delivered=(their_got, batches * BATCH_ROWS * repeat),
                )
            )
            ours, theirs, got, their_got = [], [], 0, 0
            for _ in range(repeat):  # in this process: nothing of the daemons' on the clock
                seconds, moved = _pass_through_thread_cpu(batches, engine=True)
                ours.append(seconds / batches * 1e6)
                got += moved
                seconds, moved = _pass_through_thread_cpu(batches, engine=False)
                theirs.append(seconds / batches * 1e6)
                their_got += moved
                progress(".")
            results.append(
                result(
                    "plugins.pass_through_us_per_batch",
                    "us/batch",
                    ours,
                    "pyarrow alone: open_stream | new_stream on one thread",
                    theirs,
                    higher_is_better=False,
                    delivered=(got, batches * BATCH_ROWS * repeat),
                    baseline_delivered=(their_got, batches * BATCH_ROWS * repeat),
                )
            )
            no_pool = Path(tmp) / "no-pool.toml"
            no_pool.write_text("[limits]\nplugin_workers_ready = 0\n")
            forking_env = dict(env, DPIPES_CONFIG_PATHS=str(no_pool))
            with local_daemons(["bench-fork"], runtime, env=forking_env) as (fork,):
                ours, theirs, got, their_got = [], [], 0, 0
                for i in range(repeat + 1):  # the first of each: the pool fills after a plugin stage ran
                    seconds, out = _run([*dpipes, "--node", a, "--arrow", "cat /dev/null | %bench_sink@bench-a"], env)
                    fork_seconds, fork_out = _run(
                        [*dpipes, "--node", fork, "--arrow", "cat /dev/null | %bench_sink@bench-fork"], env
                    )
                    if i:
                        ours.append(1 / seconds)
                        theirs.append(1 / fork_seconds)
                        got += out != b""
                        their_got += fork_out != b""
                    progress(".")
                results.append(
                    result(
                        "plugins.stage_starts_per_s",
                        "runs/s",
                        ours,
                        "the same, each worker forked (plugin_workers_ready = 0)",
                        theirs,
                        delivered=(got, repeat),
                        baseline_delivered=(their_got, repeat),
                    )
                )
    return results
