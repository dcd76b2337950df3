"""The tap's decoding, selection, rates and recordings, without sockets."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pyarrow as pa
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dpipes.bus import codec, tap
from dpipes.bus.arrow import ArrowEncoder
from dpipes.nodes.tap import record
from dpipes.nodes.tap.rates import Window
from dpipes.nodes.tap.source import Gaps
from dpipes.nodes.tap.view import Decoder, Filter, field, line, matches_what, objects_in


def event_of(msg: codec.Message, *, n: int = 0, sample_bytes: int = 256) -> tap.TapEvent:
    frames = codec.encode(msg)
    return tap.decode_event(
        tap.encode_event("a", n, codec.decode_header(frames[0]), frames[1:], sample_bytes=sample_bytes, now=1.0)
    )


def test_a_reply_is_typed_by_the_method_of_its_request() -> None:
    decoder = Decoder()
    request = decoder.decode(
        event_of(codec.Request(src="a/c", dst="a/ctl", seq=4, method="cancel", body={"pipeline": "p"}))
    )
    assert request["body"] == {"pipeline": "p", "reason": "cancelled"}  # the protocol's default filled in
    reply = decoder.decode(event_of(codec.Reply(src="a/ctl", dst="a/c", seq=4, body={"stages": 2})))
    assert (reply["method"], reply["ok"], reply["body"]) == ("cancel", True, {"stages": 2})
    failed = decoder.decode(
        event_of(codec.Reply(src="a/ctl", dst="a/c", seq=9, ok=False, error="no", body={"code": "syntax"}))
    )
    assert failed["code"] == "syntax" and "failed [syntax]: no" in line(failed)


def test_a_request_outside_the_protocol_is_shown_and_says_why() -> None:
    d = Decoder().decode(event_of(codec.Request(src="a/c", dst="a/svc", method="run", body={"pipeline": 3})))
    assert d["body"] == {"pipeline": 3} and "pipeline" in d["invalid"]


def test_objects_show_what_the_sample_holds_whole() -> None:
    batch = msgpack.packb([{"n": i, "pad": "x" * 50} for i in range(10)])
    d = Decoder().decode(
        event_of(codec.Objects(src="a/x", dst="b/y", sid=1, count=10, frames=(batch,)), sample_bytes=200)
    )
    assert [o["n"] for o in d["objects"]] == [0, 1, 2] and d["truncated"]
    assert objects_in(batch) == ([{"n": i, "pad": "x" * 50} for i in range(10)], True)


@given(st.binary(max_size=64))
@example(b"\x91\x81\x90\x00")  # an array of one map whose key is an array: no dict can hold it
def test_objects_of_garbage_are_none_not_an_error(data: bytes) -> None:
    objects, _whole = objects_in(data)
    assert isinstance(objects, list)


def test_arrow_shows_its_schema_and_first_rows() -> None:
    table = pa.table({"x": [1, 2, 3], "name": ["a", "b", None]})
    encoder = ArrowEncoder(table.schema)
    (part,) = encoder.encode(table.to_batches()[0])
    meta, frames = part
    decoder = Decoder()
    d = decoder.decode(
        event_of(codec.Arrow(src="a/x", dst="b/y", sid=1, arrow=meta, frames=tuple(frames)), sample_bytes=4096)
    )
    assert "x: int64" in d["schema"] and d["rows"] == [
        {"x": 1, "name": "a"},
        {"x": 2, "name": "b"},
        {"x": 3, "name": None},
    ]
    (part,) = encoder.encode(table.to_batches()[0])
    meta, frames = part
    small = decoder.decode(
        event_of(codec.Arrow(src="a/x", dst="b/y", sid=1, arrow=meta, frames=tuple(frames)), sample_bytes=8)
    )
    assert "x: int64" in small["schema"] and small["rows"] is None  # schema only when the sample is short


def test_selection_by_address_node_pipeline_stage_and_kind() -> None:
    d = Decoder().decode(event_of(codec.Bytes(src="alpha/p1.0", dst="beta/p1.1", sid=1, frames=(b"x",))))
    for what in ("alpha/p1.0", "beta/", "p1", "p1.1", "BYTES"):
        assert matches_what(d, what), what
    for what in ("gamma/", "p2", "p1.2", "CREDIT", "alpha/p1"):
        assert not matches_what(d, what), what


def test_filters_and_fields() -> None:
    d = Decoder().decode(event_of(codec.Request(src="a/c", dst="a/ctl", method="cancel", body={"pipeline": "p"})))
    assert Filter("kind == 'REQUEST' and body.pipeline == 'p'")(d)
    assert Filter("'a/' in dst and not size > 0")(d)
    assert not Filter("size > 'x'")(d)  # a comparison that does not apply is false, not an error
    assert field(d, "body.pipeline") == "p" and field(d, "body.nope.deeper") is None
    for bad in ("__import__('os')", "size.__class__()", "[x for x in src]", "lambda: 1", "size +"):
        with pytest.raises(ValueError):
            Filter(bad)


def test_window_rates() -> None:
    w = Window(3)
    assert w.hz() is None
    for t, size in ((0.0, 10), (1.0, 20), (2.0, 30), (4.0, 40)):
        w.add(t, size)
    hz, bw = w.hz(), w.bw()
    assert hz is not None and bw is not None
    assert (hz.messages, hz.rate, hz.min_s, hz.max_s) == (3, 2 / 3, 1.0, 2.0)
    assert (bw.messages, bw.bytes_per_s, bw.min, bw.max, bw.mean) == (3, 70 / 3, 20, 40, 30.0)  # 30 + 40 B in 3 s


def test_gaps_count_every_missed_event_and_survive_a_restart() -> None:
    gaps = Gaps()
    assert [gaps.note("a", n) for n in (5, 6, 9, 10)] == [0, 0, 2, 0]
    assert gaps.note("b", 100) == 0 and gaps.note("a", 0) == 0  # a restarted hub counts from 0 again
    assert gaps.note("a", 3) == 2 and gaps.dropped == 4 and gaps.by_node == {"a": 4}


@pytest.mark.parametrize("name", ["r.arrow", "r.parquet"])
def test_a_recording_reads_back_as_recorded(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    decoder = Decoder()
    events = [
        event_of(codec.Bytes(src="a/p.0", dst="b/p.1", sid=1, seq=i, frames=(b"%d\n" % i,)), n=i) for i in range(3000)
    ]
    with record.Recorder(path, recorder={"taps": []}) as rec:
        for event in events:
            rec.add(event, decoder.decode(event), 1 if event.n == 7 else 0)
    assert [e for e, _d in record.events(path)] == events
    summary = record.summary(path)
    assert (summary["events"], summary["dropped"], summary["kinds"]) == (3000, 1, {"BYTES": 3000})
    table = record.read_table(path)
    assert json.loads(table.column("decoded")[5].as_py())["text"] == "5\n"


def test_a_file_that_is_not_a_recording_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.arrow"
    path.write_bytes(b"not arrow")
    with pytest.raises(ValueError, match="not a dpipes-tap recording"):
        record.summary(path)
