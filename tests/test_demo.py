"""The demo's command line and its memory: one parser (`torchhealth.cli`), the
scenario built once, and a bounded number of Reports kept while it trains."""
import gc

import pytest

from torchhealth import demo
from torchhealth.report import Finding, Report


def test_python_m_demo_is_the_cli_command(capsys):
    assert demo.main(["--list"]) == 0  # an option only the CLI's parser had
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(demo.SCENARIOS)
    with pytest.raises(SystemExit) as e:
        demo.main(["--steps", "0"])
    assert e.value.code == 2
    assert "torchhealth demo: --steps must be at least 1" in capsys.readouterr().err


def test_demo_builds_its_scenario_once_and_keeps_few_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "_has_matplotlib", lambda: False)  # the HTML is tested elsewhere
    built, live = [], []
    real_setup = demo.setup
    monkeypatch.setattr(demo, "setup", lambda *a, **k: built.append(a) or real_setup(*a, **k))

    def held() -> int:
        gc.collect()
        return sum(type(o) is Report for o in gc.get_objects())

    def progress(i, total):
        if i == total:  # training is over: how many Reports are still held
            live.append(held())
    before = held()  # Reports other tests' fixtures still hold
    assert demo.present("nan", steps=60, log_dir=tmp_path, progress=progress) == 0
    assert live[0] - before <= 6, (live, before)  # not one per step
    assert len(built) == 1
    out = capsys.readouterr().out
    assert "first finding at step 12 (1 of 60 steps had findings)" in out
    assert "The report of step 12" in out and "   59  " in out


def test_summary_stays_bounded_when_the_status_changes_every_step():
    summary = demo._Summary(max_lines=10)
    bad = Finding("exploding", "warning", "x")
    for step in range(10_000):
        summary(Report(step, [], findings=[bad] if step % 2 else []))
    assert len(summary.shown) == 10 and len(summary.recent) == demo._Summary.BEFORE
    assert summary.fired == 5000 and summary.first.step == 1
    lines = summary.table()
    assert lines[-1].startswith(" 9999 ") and any("more step(s))" in line for line in lines)
