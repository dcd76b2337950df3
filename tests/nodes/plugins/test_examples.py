"""The example plugins (examples/plugins/), each run through the harness as an author would test it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from dpipes.nodes.plugins import CallbackFailed, PluginTestService, load_plugin

EXAMPLES = Path(__file__).parents[3] / "examples" / "plugins"

SALES = pa.table(
    {
        "region": ["west", "east", "west", "north", "east", None],
        "amount": pa.array([120, 80, 300, None, 150, 10], pa.int64()),
    }
)


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield


def run(reference: str, inputs: dict[str, list[pa.Table]], outputs: list[str], config: dict) -> PluginTestService:
    service = PluginTestService(load_plugin(reference), {name: None for name in inputs}, outputs, config)
    for name, batches in inputs.items():
        for batch in batches:
            service.run_on_record_batch(batch, name)
        service.run_on_incoming_connection_complete(name)
    service.run_on_complete()
    return service


def test_filter_keeps_rows_where_the_expression_holds() -> None:
    with run(
        "dpipes_example_plugins.filter:Filter",
        {"Input": [SALES.slice(0, 3), SALES.slice(3)]},
        ["Output"],
        {"expr": "amount > 100 and region in ['west', 'east']"},
    ) as service:
        assert service.output("Output").to_pylist() == [
            {"region": "west", "amount": 120},
            {"region": "west", "amount": 300},
            {"region": "east", "amount": 150},
        ]
        assert service.io_stream == ["INFO:filter kept 3 of 6 rows"]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("amount >= 120", [120, 300, 150]),
        ("not amount < 100", [120, 300, 150]),
        ("amount * 2 - 100 == 200", [150]),
        ("region not in ('west',) and is_valid(region)", [80, None, 150]),
        ("is_null(amount)", [None]),
        ("col('amount') < 50", [10]),
        ("-amount < -200", [300]),
        ("100 < amount < 200", [120, 150]),
    ],
)
def test_filter_expressions(expr: str, expected: list) -> None:
    with run("dpipes_example_plugins.filter:Filter", {"Input": [SALES]}, ["Output"], {"expr": expr}) as service:
        assert service.output("Output").column("amount").to_pylist() == expected


@pytest.mark.parametrize(
    "expr", ["", "__import__('os').system('true')", "amount.real > 1", "amount > [1]", "a if b else c"]
)
def test_filter_refuses_what_is_not_a_condition(expr: str) -> None:
    with pytest.raises(CallbackFailed, match="expr"):
        PluginTestService(load_plugin("dpipes_example_plugins.filter:Filter"), ["Input"], ["Output"], {"expr": expr})


def test_summarize_groups_incrementally_over_batches() -> None:
    batches = [SALES.slice(i, 1) for i in range(SALES.num_rows)]  # one row per batch: partials must combine
    with run(
        "dpipes_example_plugins.summarize:Summarize",
        {"Input": batches},
        ["Output"],
        {"by": "region", "agg": "amount:sum,amount:mean,amount:max,amount:count"},
    ) as service:
        assert service.output("Output").to_pylist() == [
            {"region": "east", "amount_sum": 230, "amount_mean": 115.0, "amount_max": 150, "amount_count": 2},
            {"region": "north", "amount_sum": None, "amount_mean": None, "amount_max": None, "amount_count": 0},
            {"region": "west", "amount_sum": 420, "amount_mean": 210.0, "amount_max": 300, "amount_count": 2},
            {"region": None, "amount_sum": 10, "amount_mean": 10.0, "amount_max": 10, "amount_count": 1},
        ]


def test_summarize_folds_many_partials_and_counts_rows_by_default() -> None:
    table = pa.table({"k": [i % 3 for i in range(300)]})
    with run(
        "dpipes_example_plugins.summarize:Summarize",
        {"Input": table.to_batches(max_chunksize=2)},
        ["Output"],
        {"by": "k"},
    ) as service:
        assert service.output("Output").to_pylist() == [
            {"k": 0, "count": 100},
            {"k": 1, "count": 100},
            {"k": 2, "count": 100},
        ]


def test_generate_writes_its_data_in_on_complete() -> None:
    with PluginTestService(
        load_plugin("dpipes_example_plugins.generate:Generate"), [], ["Output"], {"rows": "10", "batch_rows": 4}
    ) as service:
        assert service.data_streams["Output"] == []  # nothing before on_complete, but the schema is known
        assert service.schemas["Output"].names == ["n", "square"]
        service.run_on_complete()
        assert [b.num_rows for b in service.data_streams["Output"]] == [4, 4, 2]
        out = service.output("Output")
        assert out.column("n").to_pylist() == list(range(10))
        assert out.column("square").to_pylist() == [n * n for n in range(10)]


def test_split_sends_each_row_to_exactly_one_anchor() -> None:
    with run(
        "dpipes_example_plugins.split:Split", {"Input": [SALES]}, ["True", "False"], {"expr": "amount > 100"}
    ) as service:
        assert service.output("True").column("amount").to_pylist() == [120, 300, 150]
        assert service.output("False").column("amount").to_pylist() == [80, None, 10]  # null goes to False
        assert service.closed == {"True", "False"}


def test_join_streams_left_once_right_ended() -> None:
    left = pa.table({"id": [1, 2, 3, 4], "qty": [5, 6, 7, 8]})
    right = pa.table({"id": [1, 3, 5], "name": ["a", "c", "e"]})
    reference = "dpipes_example_plugins.join:Join"
    with PluginTestService(load_plugin(reference), ["Left", "Right"], ["Output"], {"on": "id"}) as service:
        service.run_on_record_batch(left.slice(0, 2), "Left")  # before Right ended: held
        assert service.data_streams.get("Output", []) == []
        service.run_on_record_batch(right, "Right")
        service.run_on_incoming_connection_complete("Right")
        assert service.output("Output").num_rows == 1  # the held Left batch joined at once
        service.run_on_record_batch(left.slice(2), "Left")
        service.run_on_incoming_connection_complete("Left")
        service.run_on_complete()
        out = service.output("Output").sort_by("id")
        assert out.to_pylist() == [{"id": 1, "qty": 5, "name": "a"}, {"id": 3, "qty": 7, "name": "c"}]


def test_join_full_outer_waits_for_all_of_left() -> None:
    left = pa.table({"id": [1, 2], "qty": [5, 6]})
    right = pa.table({"id": [2, 9], "name": ["b", "z"]})
    with run(
        "dpipes_example_plugins.join:Join",
        {"Right": [right], "Left": [left.slice(0, 1), left.slice(1)]},
        ["Output"],
        {"on": "id", "type": "full outer"},
    ) as service:
        out = service.output("Output").sort_by("id")
        assert out.column("id").to_pylist() == [1, 2, 9]
        assert out.column("name").to_pylist() == [None, "b", "z"]


def test_passthrough_reports_progress_over_a_long_input() -> None:
    table = pa.table({"x": pa.array(range(100_000), pa.int64())})
    batches = table.to_batches(max_chunksize=100)  # 1000 batches
    with run(
        "dpipes_example_plugins.passthrough:Passthrough", {"Input": batches}, ["Output"], {"expected_rows": 100_000}
    ) as service:
        progress = service.progress
        assert progress == sorted(progress) and progress[-1] == 1.0
        assert max(p for p in progress if p < 1.0) == pytest.approx(0.99)
        assert 50 <= len(progress) <= 101  # a message per percent, not per batch
        assert pc.sum(service.output("Output")["x"]).as_py() == sum(range(100_000))
