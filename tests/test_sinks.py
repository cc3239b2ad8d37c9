import dataclasses
import json
import math
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import torchhealth
from torchhealth.report import Finding, Report
from torchhealth.sinks import FlightRecorder, JsonlSink, Sink, TruncatedLogError, read_jsonl, scalars
from torchhealth.histogram_view import magnitude_counts, value_histogram

from curves_run import train_with_scalars
from logged_run import train

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def run() -> list[Report]:
    return train(steps=40, nan_at=30)


class ListSink(Sink):
    def __init__(self):
        self.reports = []

    def write(self, report):
        self.reports.append(report)


def _round_trip(path, reports):
    with JsonlSink(path) as sink:
        for r in reports:
            sink(r)
    back = read_jsonl(path)
    assert [b.to_dict() for b in back] == [r.to_dict() for r in reports]
    return back


@pytest.mark.parametrize("name", ["run.jsonl", "run.jsonl.gz"])
def test_jsonl_round_trip(tmp_path, run, name):
    path = tmp_path / name
    _round_trip(path, run)
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    else:
        assert len(path.read_text().splitlines()) == len(run) + 1  # the layout line first


@pytest.fixture(scope="module")
def curves() -> list[Report]:
    """Reports carrying the user's loss and lr; the loss is NaN at step 8."""
    return train_with_scalars(steps=12, nan_at=8)


@pytest.mark.parametrize("name", ["run.jsonl", "run.jsonl.gz"])
def test_jsonl_round_trip_of_user_scalars(tmp_path, curves, name):
    back = _round_trip(tmp_path / name, curves)
    assert [b.scalars["lr"] for b in back] == [0.05] * 10 + [0.025] * 2
    assert math.isnan(back[8].scalars["loss"]) and all(math.isfinite(b.scalars["loss"]) for b in back[:8])


def test_logs_without_user_scalars_read_as_before(tmp_path, run):
    with JsonlSink(tmp_path / "run.jsonl") as sink:
        sink(run[0])
    assert '"scalars"' not in (tmp_path / "run.jsonl").read_text()  # nothing logged, nothing written
    assert read_jsonl(tmp_path / "run.jsonl")[0].scalars == {}


@pytest.mark.parametrize("scalars, words", [("[1, 2]", "scalars is [1, 2]; expected an object"),
                                            ('{"loss": "low"}', "scalars['loss'] is 'low'"),
                                            ('{"loss": true}', "scalars['loss'] is True")])
def test_damaged_user_scalars_name_the_field(tmp_path, curves, scalars, words):
    path = tmp_path / "run.jsonl"
    with JsonlSink(path) as sink:
        sink(curves[0])
    head, record = path.read_text().splitlines()
    path.write_text(head + "\n" + re.sub(r'"scalars":\{[^}]*\}', f'"scalars":{scalars}', record) + "\n")
    with pytest.raises(ValueError, match=re.escape(words)):
        read_jsonl(path)


@pytest.mark.parametrize("histogram", [True, False])
def test_jsonl_round_trip_of_special_values_in_every_dtype(tmp_path, histogram):
    # Zeros of both signs, empty and 0-d tensors, all-NaN, infinities, subnormals and
    # extremes: every field comes back exactly (absmax and numel are not stored).
    tensors, names = [], []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        fi = torch.finfo(dtype)
        for i, values in enumerate([[0.0, -0.0], [], [float("nan")] * 3, [-fi.max, fi.max, fi.tiny * fi.eps],
                                    [float("inf"), -1e-3, 0.1, -float("inf")], [1 / 3, -2 / 3]]):
            tensors.append(torch.tensor(values, dtype=dtype))
            names.append(f"{dtype}.{i}")
    tensors.append(torch.tensor(-0.0))
    names.append("scalar")
    stats = torchhealth.tensor_stats(tensors, histogram=histogram)
    report = Report.from_stats(7, stats, names, ["grad"] * len(names), [tuple(t.shape) for t in tensors],
                               [t.dtype for t in tensors], findings=[Finding("nonfinite", "error", "m", ["x"], 3.0, 0.0)],
                               actions=["skip: nonfinite"], skipped=True)
    for name in ("r.jsonl", "r.jsonl.gz"):
        with JsonlSink(tmp_path / name) as sink:
            sink(report)
        (back,) = read_jsonl(tmp_path / name)
        assert json.dumps(back.to_dict()) == json.dumps(report.to_dict())


@pytest.mark.parametrize("name", ["run.jsonl", "run.jsonl.gz"])
def test_jsonl_appends_across_openings(tmp_path, run, name):
    path = tmp_path / name
    for part in (run[:10], run[10:20]):
        with JsonlSink(path) as sink:
            for r in part:
                sink(r)
    assert [b.step for b in read_jsonl(path)] == list(range(20))


@pytest.mark.parametrize("name", ["run.jsonl", "run.jsonl.gz"])
def test_truncated_log_is_readable_up_to_the_last_complete_record(tmp_path, run, name):
    path = tmp_path / name
    sink = JsonlSink(path)
    sizes = []
    for r in run[:5]:
        sink(r)
        sizes.append(path.stat().st_size)  # every record is on disk once written
    full = path.read_bytes()  # as left by a process killed before close()
    assert [b.step for b in read_jsonl(path)] == [0, 1, 2, 3, 4]
    # Cut anywhere inside the fifth record's write: the first four survive (five, when a
    # gzip cut leaves the record's text whole) and the error says where.
    # sizes[4] - 1 cuts only the newline: a plain record without it is incomplete (its
    # write did not finish), whatever its text; the cut positions do not decide the outcome.
    for cut in list(range(sizes[3] + 1, sizes[4], max(1, (sizes[4] - sizes[3]) // 7))) + [sizes[4] - 1]:
        path.write_bytes(full[:cut])
        with pytest.raises(TruncatedLogError) as e:
            read_jsonl(path)
        n = len(e.value.reports)
        # gzip: a cut among the last bytes of the record's deflate block may still leave its
        # whole text decodable (how many bytes that is depends on the data: the record's
        # time field changes it from run to run).
        assert n == 4 or (n == 5 and name.endswith(".gz")), (cut, n)
        assert re.search(rf"truncated at line {n + 2} .*the writer stopped mid-record; the last complete "
                         rf"record is step {n - 1}, {n} records readable", str(e.value)), str(e.value)
        assert [b.step for b in e.value.reports] == list(range(n)) and e.value.line == n + 2
        assert [b.step for b in read_jsonl(path, truncated="keep")] == list(range(n))
    # Cut inside the layout line: nothing complete.
    path.write_bytes(full[:10])
    with pytest.raises(TruncatedLogError, match="it holds no complete record, 0 records readable"):
        read_jsonl(path)
    sink.close()


def test_corrupt_record_names_its_line(tmp_path, run):
    path = tmp_path / "run.jsonl"
    with JsonlSink(path) as sink:
        sink(run[0])
    with open(path, "a") as f:
        f.write('{"not": "a report"}\n')
    with JsonlSink(path) as sink:
        sink(run[1])
    with pytest.raises(ValueError, match="line 3 is not a torchhealth record"):
        read_jsonl(path)


def test_layout_is_written_once_and_again_when_the_tensors_change(tmp_path, run):
    path = tmp_path / "run.jsonl"
    fewer = Report.from_dict({**run[2].to_dict(), "rows": [r.to_dict() for r in run[2].rows[:3]]})
    with JsonlSink(path) as sink:
        for r in (run[0], run[1], fewer, run[3]):
            sink(r)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert ["layout" in d for d in lines] == [True, False, False, True, False, True, False]
    assert lines[0]["layout"]["names"][:2] == [run[0].rows[0].name, run[0].rows[1].name]
    assert "names" not in lines[1] and "rows" not in lines[1]
    back = read_jsonl(path)
    assert [b.to_dict() for b in back] == [r.to_dict() for r in (run[0], run[1], fewer, run[3])]


def test_plain_report_dicts_are_read_too(tmp_path, run):
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in run[:3]))
    assert [b.to_dict() for b in read_jsonl(path)] == [r.to_dict() for r in run[:3]]


def test_killed_writer_leaves_a_readable_log(tmp_path):
    # A writer appending real Reports as fast as it can, killed with SIGKILL (no
    # close(), no gzip trailer, most likely in the middle of a write).
    path = tmp_path / "run.jsonl.gz"
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
            "from logged_run import train\nfrom torchhealth.sinks import JsonlSink\n"
            f"sink = JsonlSink({str(path)!r})\n"
            "reports = train(steps=3, nan_at=None, on_report=sink)\n"
            "while True:\n    sink(reports[-1])\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not path.exists() or path.stat().st_size < 200_000):
            assert proc.poll() is None, "the writer died on its own"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    try:
        reports = read_jsonl(path)
    except TruncatedLogError as e:  # killed in the middle of a write
        assert re.search(r"truncated at line \d+ .*the writer stopped mid-record", str(e))
        reports = e.reports
    assert len(reports) >= 20
    assert [r.step for r in reports[:4]] == [0, 1, 2, 2]
    assert reports[-1].to_dict() == reports[3].to_dict()


def real_sized_reports(records: int) -> list[Report]:
    """Checks of a 300-tensor model (25 transformer layers, 5M parameters) by
    the monitor, parameters and gradients with histograms, during AdamW training."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(128, 4, 512, batch_first=True)
                                  for _ in range(25)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = torchhealth.HealthMonitor(opt, model=model, histogram=True, policy="ignore")
    out = []
    monitor.on_report(out.append)
    for step in range(records):
        loss = model(torch.randn(2, 8, 128)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        monitor.check(step)
        opt.step()
    monitor.flush()
    return out


def test_log_size_budget(tmp_path):
    # 10,000 steps logged every 10 steps = 1,000 records of a 300-tensor model.
    # Write a few real-sized records (after the layout line) and scale to 1,000.
    reports = real_sized_reports(4)
    assert len(reports[0].rows) == 600 and {r.role for r in reports[0].rows} == {"param", "grad"}
    bins = sum(len(r.hist) for rep in reports for r in rep.rows) / (len(reports) * 600)
    assert bins >= 15, bins  # realistic spread: each row has many populated bins
    path = tmp_path / "run.jsonl.gz"
    with JsonlSink(path) as sink:
        sink(reports[0])
        first = path.stat().st_size  # the layout line and one record
        for r in reports[1:]:
            sink(r)
        per_record = (path.stat().st_size - first) / (len(reports) - 1)
    projected = first + per_record * 999
    print(f"\nJSONL .gz: {per_record / 1e3:.1f} kB per record of 600 rows; 1,000 records "
          f"-> {projected / 1e6:.1f} MB")
    assert projected < 50e6, f"{projected / 1e6:.1f} MB for 1,000 records"
    assert [b.to_dict() for b in read_jsonl(path)] == [r.to_dict() for r in reports]


def test_flight_recorder_writes_what_led_up_to_a_fault(run):
    out = ListSink()
    recorder = FlightRecorder(out, capacity=8, every=10)
    for r in run:
        recorder(r)
    # Sparse logging (steps 0, 10, 20) until step 30 fired: then the 7 steps before it.
    assert [r.step for r in out.reports[:3]] == [0, 10, 20]
    assert [r.step for r in out.reports[3:]] == list(range(23, 31))
    assert len(recorder.recent) == 8 and recorder.recent[-1].step == 39


def test_flight_recorder_keeps_check_results_without_building_reports():
    out, results = ListSink(), []
    recorder = FlightRecorder(out, capacity=4, every=5)

    def keep(result):
        results.append(result)
        recorder.record(result)
    train(steps=16, nan_at=12, on_result=keep)
    recorder.close()
    # Sparse (0, 5, 10) until step 12 fired: then 11 and 12; then sparse again (15).
    assert [r.step for r in out.reports] == [0, 5, 10, 11, 12, 15]
    written = {r.step for r in out.reports}
    # Checks that were not written stayed device-side statistics: no Report was built.
    assert [res.step for res in results if res._report is not None] == sorted(written)
    assert out.reports[4].findings[0].check == "nonfinite" and out.reports[4].skipped


def test_flight_recorder_never_writes_a_report_twice():
    out = ListSink()
    recorder = FlightRecorder(out, capacity=4, every=2)
    bad = Finding("nonfinite", "error", "x")
    for step in range(8):
        recorder(Report(step, [], findings=[bad] if step in (3, 4) else []))
    assert [r.step for r in out.reports] == [0, 2, 3, 4, 6]


def test_value_histogram_uses_the_stored_bins():
    x = torch.tensor([-3.0, 0.0, 1.5, 0.75, 0.7, 1e-3])
    rep = Report.from_stats(0, torchhealth.tensor_stats([x]), ["w"], ["grad"], [(6,)], [torch.float32])
    edges, counts = value_histogram(rep.rows[0])
    # [-4, -2): -3; gap holding the zero; [2^-10, 2^-9): 1e-3; ...; [0.5, 1): 0.75, 0.7; [1, 2): 1.5
    assert edges[:3] == [-4.0, -2.0, 2.0 ** -10] and edges[-3:] == [0.5, 1.0, 2.0]
    assert counts[0] == 1 and counts[1] == 1 and counts[-2:] == [2, 1] and sum(counts) == 6
    assert all(a < b for a, b in zip(edges, edges[1:]))
    assert magnitude_counts(rep.rows[0]) == {1: 1, -10: 1, -1: 2, 0: 1}


def test_value_histogram_merges_to_max_bins():
    x = torch.tensor([1e-300, -1e300, 1.0], dtype=torch.float64)  # spans the whole grid
    row = Report.from_stats(0, torchhealth.tensor_stats([x]), ["w"], ["grad"], [(3,)],
                            [torch.float64]).rows[0]
    edges, counts = value_histogram(row, max_bins=64)
    assert len(counts) <= 64 and len(edges) == len(counts) + 1 and sum(counts) == 3
    assert edges[0] == -1e300 and edges[-1] > 1.0 and all(math.isfinite(e) for e in edges)


def test_tensorboard_sink_read_back_with_tensorboards_reader(tmp_path, run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from torchhealth.sinks import TensorBoardSink
    with TensorBoardSink(tmp_path) as sink:
        for r in run[:3] + run[30:31]:
            sink(r)
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.value for e in acc.Scalars("health/grad_norm")] == pytest.approx(
        [r.grad_norm for r in run[:3] + run[30:31]], nan_ok=True)  # NaN at the NaN step
    assert [e.step for e in acc.Scalars("health_tensors/grad_norm/2.weight")] == [0, 1, 2, 30]
    assert acc.Scalars("health/findings")[-1].value == 1
    h = acc.Histograms("health_histograms/grad/2.weight")[0].histogram_value
    row = next(r for r in run[0].rows if r.role == "grad" and r.name == "2.weight")
    edges, counts = value_histogram(row)
    assert list(h.bucket) == counts and list(h.bucket_limit) == pytest.approx(edges[1:])
    assert (h.num, h.min, h.max, h.sum_squares) == (sum(counts), row.min, row.max, pytest.approx(row.sumsq))
    assert any("health/findings" in t for t in tags.get("tensors", []))


def test_wandb_sink_offline(tmp_path, run, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from torchhealth.sinks import WandbSink
    logged = []
    with WandbSink(project="torchhealth-test", dir=str(tmp_path)) as sink:
        real_log = sink.run.log
        sink.run.log = lambda data, step: (logged.append((step, data)), real_log(data, step=step))
        for r in run[:3]:
            sink(r)
    assert [s for s, _ in logged] == [0, 1, 2]
    step, data = logged[0]
    hist = data["grad_hist/2.weight"]
    assert isinstance(hist, wandb.Histogram) and len(hist.histogram) <= 512
    assert len(hist.bins) == len(hist.histogram) + 1
    assert data["health/grad_norm"] == pytest.approx(run[0].grad_norm)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def _without_histograms(reports: list[Report]) -> list[Report]:
    """The Reports as a check without histograms makes them (``hist`` None)."""
    return [dataclasses.replace(r, rows=[dataclasses.replace(w, hist=None) for w in r.rows])
            for r in reports]


def _tensorboard(tmp_path, reports, **kwargs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from torchhealth.sinks import TensorBoardSink
    with TensorBoardSink(tmp_path, **kwargs) as sink:
        for r in reports:
            sink(r)
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc.Tags()


def test_tensorboard_writes_no_histogram_that_was_not_measured(tmp_path, run):
    pytest.importorskip("tensorboard")
    tags = _tensorboard(tmp_path, _without_histograms(run[:3]))
    assert tags["histograms"] == []  # not one made of the zero count alone
    assert "health/grad_norm" in tags["scalars"]


def test_tensorboard_groups_per_tensor_metrics_in_one_section(tmp_path, run):
    pytest.importorskip("tensorboard")
    tags = _tensorboard(tmp_path, run[:2])
    sections = {t.split("/")[0] for t in tags["scalars"] + tags["histograms"]}
    assert sections == {"health", "health_tensors", "health_histograms"}
    assert "health_tensors/param_absmax/0.bias" in tags["scalars"]


def test_tensorboard_per_tensor_off_writes_the_totals_only(tmp_path, run):
    pytest.importorskip("tensorboard")
    tags = _tensorboard(tmp_path, run[:2], per_tensor=False, histograms=False)
    assert sorted(tags["scalars"]) == sorted(scalars(run[0], per_tensor=False))
    assert all(t.startswith("health/") for t in tags["scalars"]) and tags["histograms"] == []


def _wandb_records(tmp_path) -> list:
    """The records of the finished offline run in `tmp_path`. ``run.finish()`` can
    return before W&B's writer process has written the file: read it again until
    it ends with the run's exit record."""
    path = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 30
    while True:
        records = _wandb_file(path.read_bytes())
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _wandb_file(data: bytes) -> list:
    """Records of a .wandb file as W&B stores them (LevelDB-style log: a 7-byte
    file header, then 32 KiB blocks of chunks each with a 7-byte header: CRC,
    little-endian length, type FULL=1/FIRST/MIDDLE/LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb
    out, pos, buf, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block is padding
            pos += block - pos % block
            continue
        n, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


@pytest.mark.parametrize("alerts", [False, True])
def test_wandb_gets_the_findings_text_and_opt_in_alerts(tmp_path, run, monkeypatch, alerts):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from torchhealth.sinks import WandbSink
    fault = run[30]
    assert [f.severity for f in fault.findings] == ["error"]
    with WandbSink(project="torchhealth-test", dir=str(tmp_path), alerts=alerts, per_tensor=False,
                   histograms=False) as sink:
        for r in _without_histograms(run[29:31]):
            sink(r)
    records = _wandb_records(tmp_path)
    history = [{i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json)
                for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [29, 30]
    assert "health/findings_text" not in history[0]
    assert fault.findings[0].message in history[1]["health/findings_text"]
    assert not any("/" in k and not k.startswith("health/") for h in history for k in h)  # per_tensor=False
    sent = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    if alerts:
        assert [(a.title, a.level) for a in sent] == [("torchhealth: nonfinite", "ERROR")]
        assert fault.findings[0].message in sent[0].text and "step 30" in sent[0].text
    else:
        assert sent == []


def test_tensorboard_and_wandb_get_the_user_scalars_in_their_own_group(tmp_path, curves, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = _tensorboard(tmp_path / "tb", curves, per_tensor=False, histograms=False)
    assert {"user/loss", "user/lr"} <= set(tags["scalars"])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("user/loss")]
    assert losses == pytest.approx([r.scalars["loss"] for r in curves], nan_ok=True) and math.isnan(losses[8])
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from torchhealth.sinks import WandbSink
    sent = []
    with WandbSink(project="torchhealth-test", dir=str(tmp_path), per_tensor=False, histograms=False) as sink:
        sink.run.log = lambda data, step: sent.append((step, data))
        for r in curves[7:9]:
            sink(r)
    assert [(s, d["user/lr"]) for s, d in sent] == [(7, 0.05), (8, 0.05)]
    assert math.isnan(sent[1][1]["user/loss"])  # at step 8, logged as such
    assert "user/loss" not in scalars(curves[0])  # a callback logging `scalars` does not log the loss twice


def test_optional_sinks_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails
    from torchhealth.sinks import WandbSink
    with pytest.raises(ImportError, match=r"pip install torchhealth\[wandb\]"):
        WandbSink()
