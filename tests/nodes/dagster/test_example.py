"""The README's Dagster example, run as a user would: `dagster asset materialize` against real daemons."""

# No `from __future__ import annotations`, as in test_client.py.
import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

try:
    import dagster as dg
except ImportError:  # only outside CI: there the test extra installs dagster, and its absence must fail
    if os.environ.get("CI"):
        raise
    pytest.skip("dagster is not installed (pip install -e '.[test]')", allow_module_level=True)

from tests.nodes.daemons import daemons, environment

ROOT = Path(__file__).parents[3]
DEFINITIONS = "examples/dagster/definitions.py"  # relative to ROOT, as the README's command has it
MATERIALIZE_TIMEOUT_S = 90.0  # dagster's own start-up is most of it, on a busy machine


def test_the_readme_shows_the_example_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"`{re.escape(DEFINITIONS)}`:\n\n```python\n(.*?)```\n", readme, re.S)
    assert match, f"the README's Dagster section shows {DEFINITIONS} in a python block"
    assert match[1] == (ROOT / DEFINITIONS).read_text()


async def test_dagster_asset_materialize_runs_the_example_on_the_worker_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemons' `python3` and the `dagster` command are this environment's, with dagster-pipes.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    runtime, home = tmp_path / "run", tmp_path / "dagster_home"
    runtime.mkdir(mode=0o700)
    home.mkdir()
    async with daemons(runtime, ["alpha", "beta"], secure=True) as (alpha, _beta):
        env = {**environment(runtime), "DPIPES_NODE": alpha.host_port, "DAGSTER_HOME": str(home)}
        proc = await asyncio.create_subprocess_exec(
            "dagster", "asset", "materialize", "-f", DEFINITIONS, "--select", "orders",
            cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), MATERIALIZE_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("orders"))
        assert event is not None and event.asset_materialization is not None
        metadata = event.asset_materialization.metadata
        assert metadata["node"].value == "beta" and metadata["rows"].value == 2
        logs = [entry.message for entry in instance.all_logs(event.run_id)]
        assert "2 of 3 orders kept on node beta" in logs
        (check,) = instance.all_logs(event.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        assert check.dagster_event is not None
        assert check.dagster_event.event_specific_data.passed is True
