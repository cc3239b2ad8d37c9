"""The `torchhealth` command line: through main(argv) with captured output, and
as a real process where a crash would show (tracebacks, exit codes)."""
import io
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import torchhealth
from torchhealth import cli
from torchhealth.sinks import JsonlSink

from logged_run import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("log") / "run.jsonl"
    with JsonlSink(path) as sink:
        train(steps=12, nan_at=8, on_report=sink)
    return path


def run_cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchhealth.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def one_line_error(capsys_or_text) -> str:
    err = capsys_or_text if isinstance(capsys_or_text, str) else capsys_or_text.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- report --------------------------------------------------------------------------------------
def test_report_writes_the_html(tmp_path, log, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sub" / "report.html"
    assert cli.main(["report", str(log), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out} (12 records, steps 0-11)"
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 3 and "nonfinite" in page


def test_report_heatmaps_of_the_parameters_asked_for(tmp_path, log, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.html"
    assert cli.main(["report", str(log), "-o", str(out), "--heatmap", "4.*", "--heatmap", "0.bias"]) == 0
    assert 'alt="log2-magnitude histograms over steps: 4.weight, 4.bias, 0.bias"' in out.read_text()
    assert cli.main(["report", str(log), "-o", str(out), "--heatmaps", "0"]) == 0
    page = out.read_text()
    assert "No heatmap was asked for" in page and page.count("data:image/png;base64,") == 2


@pytest.mark.parametrize("argv, words", [
    (["--heatmap", "4.wieght"], "torchhealth report: --heatmap: no parameter matches the heatmap pattern "
                                "'4.wieght'; close names: 4.weight"),
    (["--heatmaps", "-1"], "torchhealth report: --heatmaps -1: give a number >= 0"),
    (["--heatmaps", "2", "--heatmap", "0.*"], "argument --heatmap: not allowed with argument --heatmaps"),
])
def test_report_bad_heatmap_choice_is_one_line_and_status_2(tmp_path, log, capsys, argv, words):
    assert cli.main(["report", str(log), "-o", str(tmp_path / "r.html"), *argv]) == 2
    assert words in one_line_error(capsys)
    assert not (tmp_path / "r.html").exists()


def test_report_default_output_is_next_to_the_log(tmp_path, log, capsys):
    gz = tmp_path / "run.jsonl.gz"
    with JsonlSink(gz) as sink:
        train(steps=3, nan_at=None, on_report=sink)
    assert cli.main(["report", str(gz)]) == 0
    assert (tmp_path / "run.html").exists()


def test_report_of_a_missing_file(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope.jsonl")]) == 1
    assert one_line_error(capsys) == f"torchhealth report: {tmp_path / 'nope.jsonl'}: no such file"


def test_report_of_a_truncated_log(tmp_path, log, capsys):
    cut = tmp_path / "cut.jsonl"
    data = log.read_bytes()
    cut.write_bytes(data[:len(data) - 100])  # inside the last record
    assert cli.main(["report", str(cut), "-o", str(tmp_path / "r.html")]) == 1
    line = one_line_error(capsys)
    assert "truncated at line 13" in line and "11 records readable" in line and "--partial" in line
    assert not (tmp_path / "r.html").exists()
    assert cli.main(["report", str(cut), "-o", str(tmp_path / "r.html"), "--partial"]) == 0
    assert "11 records, steps 0-10" in capsys.readouterr().out


def test_report_of_something_else(tmp_path, capsys):
    junk = tmp_path / "junk.jsonl"
    junk.write_text("hello\nworld\n")
    assert cli.main(["report", str(junk)]) == 1
    assert "line 1 is not a torchhealth record" in one_line_error(capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["report", str(empty)]) == 1
    assert one_line_error(capsys).endswith("holds no record")


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["report"], ["report", "a", "--bogus"],
                                  ["demo", "--steps", "many"], ["demo", "--steps", "0"],
                                  ["demo", "--scenario", "nope"]])
def test_bad_arguments_get_one_line_and_status_2(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    if argv:
        line = one_line_error(err)
        assert line.startswith("torchhealth")
    else:  # no command: the help, on stderr
        assert "demo" in err and "doctor" in err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("demo", "bench", "report", "doctor"))


def test_version(capsys):
    import torchhealth
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"torchhealth {torchhealth.__version__}"


# -- demo ---------------------------------------------------------------------------------------------
def test_demo_runs_with_a_progress_bar_and_says_where_its_output_went(tmp_path):
    pytest.importorskip("matplotlib")
    p = run_cli("demo", "--scenario", "nan", "--steps", "15", "--log-dir", tmp_path / "demo", timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "15/15" in p.stderr  # the bar, on stderr
    assert "\r" not in p.stderr  # not a terminal: the final state only, no redrawn lines
    assert f"Log   : {tmp_path / 'demo' / 'run.jsonl'}" in p.stdout
    assert f"Report: {tmp_path / 'demo' / 'report.html'}" in p.stdout
    assert "nonfinite  first fired at step" in p.stdout
    assert (tmp_path / "demo" / "run.jsonl").stat().st_size > 0
    assert (tmp_path / "demo" / "report.html").stat().st_size > 0


def test_demo_list(capsys):
    from torchhealth.demo import SCENARIOS
    assert cli.main(["demo", "--list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(SCENARIOS)


def test_plain_progress_bar():
    out = io.StringIO()
    bar = cli.Progress("training", out, use_tqdm=False, width=10, live=True)
    for i in range(1, 11):
        bar(i, 10)
    bar.close()
    text = out.getvalue()
    assert text.startswith("\rtraining [") and text.endswith("\n")
    assert "[##########] 10/10 steps" in text.splitlines()[-1].split("\r")[-1]


@pytest.mark.parametrize("use_tqdm", [None, False])
def test_progress_bar_off_a_terminal_writes_one_final_line(use_tqdm):
    out = io.StringIO()  # not a terminal, like a log file or a CI job
    bar = cli.Progress("benchmark", out, use_tqdm=use_tqdm, width=10, unit="run")
    for i in range(1, 101):
        bar(i, 100, "some method")
    bar.close()
    assert "\r" not in out.getvalue() and out.getvalue().count("\n") == 1
    assert out.getvalue().startswith("benchmark [##########] 100/100 runs")


# -- bench --------------------------------------------------------------------------------------------
def replace_bench(monkeypatch, module) -> None:
    """Makes `from . import bench` in the CLI give `module` (None: fail), whether
    or not an earlier test imported the real one (which sets the package's
    attribute, read before sys.modules)."""
    monkeypatch.setitem(sys.modules, "torchhealth.bench", module)
    if module is None:
        monkeypatch.delattr(torchhealth, "bench", raising=False)
    else:
        monkeypatch.setattr(torchhealth, "bench", module, raising=False)


def test_bench_passes_its_arguments_on(monkeypatch):
    seen = []

    def main(argv, progress, prog):
        seen.append((argv, prog))
        progress(1, 2, "a method")
        return 3
    replace_bench(monkeypatch, types.SimpleNamespace(main=main))
    assert cli.main(["bench", "--quick", "-n", "5"]) == 3
    assert seen == [(["--quick", "-n", "5"], "torchhealth bench")]


def test_bench_help_names_the_command():
    p = run_cli("bench", "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: torchhealth bench ") and "torchhealth.bench" not in p.stdout


def test_bench_quick_prints_the_comparison_table_and_its_noise_caveat():
    p = run_cli("bench", "--quick", timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and re.search(r"\b(\d+)/\1 runs\b", p.stderr)  # the finished bar
    assert "\r" not in p.stderr  # stderr is a pipe here: no bar redrawn into it
    for text in ("floor: torch.sum(flat buffer)", "pure-Python checks + .item()", "x floor"):
        assert text in p.stdout, text
    assert "within timing noise" in p.stdout


def test_bench_missing_is_one_line(monkeypatch, capsys):
    replace_bench(monkeypatch, None)
    assert cli.main(["bench"]) == 1
    assert one_line_error(capsys).startswith("torchhealth bench: the benchmark is not available")


# -- doctor ---------------------------------------------------------------------------------------------
def test_doctor_reports_the_build(capsys):
    import torch
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"torch       {torch.__version__}" in out
    assert "backend     extension: torchhealth._C from" in out
    assert f"torch.get_num_threads() = {torch.get_num_threads()}" in out
    assert "compiler  GCC" in out or "compiler  clang" in out
    active = torch.ops.torchhealth._cpu_kernel("")
    assert active in ("scalar", "avx2", "avx512") and f"CPU       kernel {active} " in out
    assert "self-test   tensor_stats agrees with the reference" in out and out.rstrip().endswith("OK")


def test_doctor_fails_with_advice_without_the_extension():
    code = ("import sys; sys.modules['torchhealth._C'] = None\n"  # as if it were not built
            "import warnings; warnings.simplefilter('ignore')\n"
            "from torchhealth.cli import main; sys.exit(main(['doctor']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 1
    line = one_line_error(p.stderr)
    assert "not in use" in line and "pip install --no-build-isolation -e ." in line
    assert "backend     reference" in p.stdout


def test_doctor_fails_when_the_kernels_disagree(monkeypatch, capsys):
    import torch

    import torchhealth
    real = torchhealth.tensor_stats

    def broken(tensors, **kw):
        s = real(tensors, **kw)
        s.data[:, 1] += 1  # one NaN too many
        return s
    monkeypatch.setattr(torchhealth, "tensor_stats", broken)
    assert cli.main(["doctor"]) == 1
    assert "disagrees with the reference" in one_line_error(capsys)
    assert torch  # noqa


def test_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'torchhealth = "torchhealth.cli:main"' in text
    p = run_cli("report", "/nonexistent/run.jsonl")
    assert p.returncode == 1 and one_line_error(p.stderr).endswith("no such file")


# -- hostile logs, appended runs, the output path ------------------------------------------------------
def test_report_refuses_to_overwrite_its_log(log, capsys):
    before = log.read_bytes()
    assert cli.main(["report", str(log), "-o", str(log)]) == 2
    assert "is the log itself" in one_line_error(capsys)
    link = log.with_name("alias.jsonl")
    link.symlink_to(log)
    assert cli.main(["report", str(link), "-o", str(log)]) == 2
    assert "is the log itself" in one_line_error(capsys)
    assert log.read_bytes() == before


def test_report_of_a_log_damaged_in_the_middle(tmp_path, log, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = log.read_bytes().split(b"\n")
    bad.write_bytes(b"\n".join(lines[:4] + [b'{"step": 3, "cut sho'] + lines[4:]))
    assert cli.main(["report", str(bad), "-o", str(tmp_path / "r.html")]) == 1
    line = one_line_error(capsys)
    assert "line 5 is not a torchhealth record" in line and "--partial" in line
    assert cli.main(["report", str(bad), "-o", str(tmp_path / "r.html"), "--partial"]) == 0
    out, err = capsys.readouterr()
    assert "12 records, steps 0-11" in out
    assert "skipped 1 damaged line(s): line 5 (byte" in err and "Traceback" not in err


@pytest.mark.parametrize("edit", ['"counts":[[1e999', '"step":1e999', '"hist":' + "[" * 50_000,
                                  '"hist":[[[600', '"counts":[[-1'], ids=["count-1e999", "step-1e999",
                                                                        "nested", "column", "negative"])
def test_report_of_a_crafted_log_is_one_line(tmp_path, log, edit, capsys):
    crafted = tmp_path / "crafted.jsonl"
    lines = log.read_text().splitlines()
    key = edit.split(":")[0]
    lines[3] = re.sub(re.escape(key) + r":(\[\[|\[|)", lambda m: edit, lines[3], count=1)
    crafted.write_text("\n".join(lines) + "\n")
    assert cli.main(["report", str(crafted), "-o", str(tmp_path / "r.html")]) == 1
    assert "line 4" in one_line_error(capsys)
    assert cli.main(["report", str(crafted), "-o", str(tmp_path / "r.html"), "--partial"]) == 0
    assert "11 records" in capsys.readouterr().out


def test_report_shows_the_latest_run_of_an_appended_log(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    for steps in (6, 3):
        with JsonlSink(path) as sink:
            train(steps=steps, nan_at=None, on_report=sink)
    assert cli.main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 0
    assert "3 records, steps 0-2; run 2 of 2" in capsys.readouterr().out
    assert '<div class=card><b>3</b>records</div>' in (tmp_path / "r.html").read_text()
    assert cli.main(["report", str(path), "-o", str(tmp_path / "r.html"), "--run", "1"]) == 0
    assert "6 records, steps 0-5; run 1 of 2" in capsys.readouterr().out
    assert cli.main(["report", str(path), "--run", "3"]) == 2
    assert "the log holds 2 run(s)" in one_line_error(capsys)


def test_doctor_diagnoses_a_bad_cpu_kernel_setting(monkeypatch, capsys):
    monkeypatch.setenv("TORCHHEALTH_CPU_KERNEL", "garbage")
    assert cli.main(["doctor"]) == 1
    line = one_line_error(capsys)
    assert "TORCHHEALTH_CPU_KERNEL='garbage' is not a valid value" in line
    assert "auto, scalar, avx2, avx512" in line


def test_demo_of_a_run_that_is_nan_from_the_first_step(tmp_path):
    pytest.importorskip("matplotlib")
    p = run_cli("demo", "--scenario", "nan", "--steps", "1", "--log-dir", tmp_path, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "<td>nonfinite</td>" in (tmp_path / "report.html").read_text()
