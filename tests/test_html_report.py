"""The HTML report, built from a real logged training run."""
import base64
import io
import math
import re
import sys

import pytest

from torchhealth.html_report import render, write_report
from torchhealth.report_plots import LIMITS
from torchhealth.sinks import JsonlSink, read_jsonl

from curves_run import train_with_scalars
from logged_run import train


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run written to a JSON Lines log and read back, as `torchhealth report` does."""
    path = tmp_path_factory.mktemp("run") / "run.jsonl"
    with JsonlSink(path) as sink:
        train(steps=40, nan_at=30, on_report=sink)
    return read_jsonl(path)


def _capture_figures(monkeypatch) -> list:
    """Every matplotlib figure the report draws from now on, in order."""
    from torchhealth import report_plots
    figures = []
    real = report_plots.png
    monkeypatch.setattr(report_plots, "png", lambda fig, alt: figures.append(fig) or real(fig, alt))
    return figures


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_is_self_contained_and_every_image_decodes(tmp_path, logged):
    pytest.importorskip("matplotlib")
    PIL = pytest.importorskip("PIL.Image")
    out = write_report(logged, tmp_path / "report.html", source="run.jsonl")
    page = out.read_text(encoding="utf-8")
    images = _images(page)
    assert len(images) == 3  # norms, heatmaps, timeline
    for png in images:
        img = PIL.open(io.BytesIO(png))
        img.load()  # decodes the whole image
        assert img.format == "PNG" and img.width > 400 and img.height > 100
        assert len(img.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10  # not blank
    # Nothing external: no URL, every src is inline data, no stylesheet or script files.
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.IGNORECASE)
    assert all(s.startswith("data:") for s in re.findall(r'src="([^"]*)"', page))
    assert not re.search(r"<link|<script|@import|url\(", page, re.IGNORECASE)
    assert "href=" not in page


def test_report_shows_the_run(logged):
    page = render(logged, source="run.jsonl")
    for heading in ("Gradient and weight norms", "Log2-magnitude histograms over steps",
                    "Checks that fired", "Worst parameters"):
        assert f"<h2>{heading}</h2>" in page
    # The fault: the step, the check and the skip are in the findings table.
    assert re.search(r"<tr class=\"error\"><td>30</td><td>error</td><td>nonfinite</td>.*?<td>yes</td></tr>", page)
    # The worst-parameters table lists every parameter, the ones the finding named first.
    table = page[page.index("<h2>Worst parameters</h2>"):]
    names = re.findall(r"<tr[^>]*><td>([^<]+)</td>", table)
    assert sorted(names) == sorted({"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"})
    assert '<div class=card><b>40</b>records</div>' in page


def test_heatmap_marks_the_float16_limits(logged):
    mpl = pytest.importorskip("matplotlib")
    import matplotlib.figure
    from torchhealth.html_report import _params
    from torchhealth.report_plots import heatmap
    params = _params(logged)
    ax = matplotlib.figure.Figure().subplots()
    mesh = heatmap(mpl, ax, params["0.weight"].rows["grad"], "0.weight: gradient")
    assert mesh is not None
    drawn = sorted(line.get_ydata()[0] for line in ax.lines)
    # 65504, 2^-14 and 2^-24 are inside the chart; bfloat16's limits are marked at its edge.
    assert drawn == pytest.approx([-24.0, -14.0, math.log2(65504.0)])
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "fp16 max 65504" in texts and "bf16 smallest normal" in texts
    assert {d for _, _, d in LIMITS} == {"float16", "bfloat16"}


def test_report_without_matplotlib_keeps_its_tables(logged, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = render(logged)
    assert not _images(page)
    assert "pip install torchhealth[report]" in page and "<h2>Worst parameters</h2>" in page


def test_empty_log_is_an_error():
    with pytest.raises(ValueError, match="no reports"):
        render([])


# -- hostile and degenerate runs ---------------------------------------------------------------
def _reports(names, grads, step0=0, **kwargs):
    """One Report per step: parameter and gradient rows of `names`, gradients `grads[step]`."""
    import torch

    import torchhealth
    from torchhealth.report import Report
    out = []
    for i, g in enumerate(grads):
        tensors = [torch.ones(3) for _ in names] + [torch.tensor(g, dtype=torch.float32) for _ in names]
        out.append(Report.from_stats(step0 + i, torchhealth.tensor_stats(tensors), names * 2,
                                     ["param"] * len(names) + ["grad"] * len(names), [(3,)] * 2 * len(names),
                                     [torch.float32] * 2 * len(names), **kwargs))
    return out


@pytest.mark.parametrize("grad", [[0.0, 0.0, 0.0], [float("nan")] * 3], ids=["zero", "nan"])
def test_report_of_a_run_whose_gradients_are_all_zero_or_nan(tmp_path, grad):
    pytest.importorskip("matplotlib")
    from torchhealth.report import Finding
    fired = {"findings": [Finding("nonfinite", "error", "w is NaN", ["w"])], "skipped": True}
    page = write_report(_reports(["w"], [grad] * 2, **fired), tmp_path / "r.html").read_text()
    assert len(_images(page)) == 3 and "<h2>Worst parameters</h2>" in page
    single = render(_reports(["w"], [grad], **fired))  # one step: `torchhealth demo --steps 1`
    assert len(_images(single)) == 3 and "<td>nonfinite</td>" in single


def test_names_are_drawn_literally(monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.text import Text

    names = ["a$_$", "cost$^$", "price$usd$"]
    figures = _capture_figures(monkeypatch)
    page = render(_reports(names, [[1.0, 2.0, 3.0]] * 3))
    drawn = {t.get_text(): t.get_parse_math() for f in figures for t in f.findobj(Text) if "$" in t.get_text()}
    assert any("price$usd$" in t for t in drawn) and not any(drawn.values()), drawn
    assert "price$usd$" in page


PAYLOAD = "\"'><script>alert(1)</script><b x=\""


def test_every_string_from_a_log_is_escaped(tmp_path):
    from torchhealth.report import Finding
    findings = [Finding(PAYLOAD + "check", PAYLOAD, PAYLOAD + "message", [PAYLOAD + "name"], 1.0, 0.0)]
    reports = _reports([PAYLOAD + "name"], [[1.0, float("nan"), 0.0]] * 2, findings=findings,
                       actions=[PAYLOAD + "action"], skipped=True)
    for rep in reports:
        for r in rep.rows:
            r.role, r.dtype = PAYLOAD + r.role, PAYLOAD + "dtype"
    path = tmp_path / "run.jsonl"
    with JsonlSink(path) as sink:
        for r in reports:
            sink(r)
    back = read_jsonl(path)
    assert back[0].findings[0].severity == PAYLOAD and back[0].rows[0].role.startswith(PAYLOAD)
    page = render(back, title=PAYLOAD, source=PAYLOAD)
    assert "<script" not in page.lower() and "<b x=" not in page
    assert "&lt;script&gt;" in page and page.count("&quot;&#x27;&gt;&lt;script&gt;") >= 4


def test_failed_write_leaves_the_previous_report(tmp_path, logged):
    # A real failure: a file-size limit below the page's size (as a full disk would).
    import subprocess
    path = tmp_path / "report.html"
    log = tmp_path / "run.jsonl"
    with JsonlSink(log) as sink:
        for r in logged[:5]:
            sink(r)
    path.write_text("the previous report")
    code = ("import resource, signal, sys\n"
            "from torchhealth.html_report import write_report\nfrom torchhealth.sinks import read_jsonl\n"
            f"reports = read_jsonl({str(log)!r})\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
            "try:\n"
            f"    write_report(reports, {str(path)!r})\n"
            "except OSError as e:\n"
            "    print(e.errno); sys.exit(3)\n")
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert p.returncode == 3, p.stderr  # the write failed (EFBIG)
    assert path.read_text() == "the previous report"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["report.html", "run.jsonl"]  # no temporary left
    out = write_report(logged[:5], path)  # and without the limit it is replaced
    assert out.read_text().startswith("<!DOCTYPE html>")


# -- what is drawn: only what was measured, named, and not on top of each other ------------------
@pytest.fixture(scope="module")
def curves():
    """A real run whose Reports carry loss and learning rate, 14 parameters."""
    return train_with_scalars(steps=30, nan_at=20, depth=6)


def _figures(monkeypatch, reports) -> tuple[str, list]:
    figures = _capture_figures(monkeypatch)
    return render(reports), figures


def test_no_histograms_no_heatmaps_but_one_note_on_how_to_record_them(monkeypatch):
    pytest.importorskip("matplotlib")
    reports = train_with_scalars(steps=12, nan_at=8, histogram=False)
    assert all(r.hist is None for rep in reports for r in rep.rows)
    page, figures = _figures(monkeypatch, reports)
    assert page.count("Histograms were not recorded") == 1 and "histogram=True" in page
    assert "no finite nonzero values" not in page
    titles = [ax.get_title() for f in figures for ax in f.axes]
    assert not any(t.endswith((": gradient", ": weight")) for t in titles), titles
    assert len(_images(page)) == 3  # curves, norms, timeline: no empty heatmap panels


def test_heatmaps_leave_the_checks_without_a_histogram_out():
    mpl = pytest.importorskip("matplotlib")
    import dataclasses

    import matplotlib.figure
    from torchhealth.html_report import _params
    from torchhealth.report_plots import heatmap
    reports = train_with_scalars(steps=6, nan_at=None)
    # a histogram every other check, as a cadence gives it
    reports = [r if r.step % 2 == 0 else dataclasses.replace(
        r, rows=[dataclasses.replace(w, hist=None) for w in r.rows]) for r in reports]
    ax = matplotlib.figure.Figure().subplots()
    mesh = heatmap(mpl, ax, _params(reports)["0.weight"].rows["grad"], "0.weight: gradient")
    data = mesh.get_array()
    assert data.shape[1] == 3  # steps 0, 2, 4: no column of zeros for the steps in between
    assert not data.mask.all(axis=0).any()


def test_user_scalars_are_drawn_as_training_curves(monkeypatch, curves, logged):
    pytest.importorskip("matplotlib")
    page, figures = _figures(monkeypatch, curves)
    assert "<h2>Training curves</h2>" in page
    panels = {ax.get_title(): ax for f in figures for ax in f.axes if ax.get_title() in ("loss", "lr")}
    assert set(panels) == {"loss", "lr"}
    x, y = panels["lr"].lines[0].get_data()
    assert list(x) == [r.step for r in curves] and list(y) == [r.scalars["lr"] for r in curves]
    assert list(panels["loss"].lines[0].get_ydata()) == pytest.approx([r.scalars["loss"] for r in curves], nan_ok=True)
    assert "<h2>Training curves</h2>" not in render(logged)  # nothing logged, nothing drawn


def test_colour_scale_names_the_parameters(monkeypatch, curves):
    pytest.importorskip("matplotlib")
    _, figures = _figures(monkeypatch, curves)
    norms = figures[1]  # after the curves
    texts = [t.get_text() for t in norms.findobj(mpl_text()) if t.get_text()]
    assert not any("index" in t for t in texts)
    names = {r.name for r in curves[0].rows}
    assert len(names) > 10  # no legend: the colour bar carries the names
    assert len(names & set(texts)) >= 8 and {"0.weight", "12.bias"} <= set(texts)


def mpl_text():
    from matplotlib.text import Text
    return Text


def test_no_text_overlaps_another_in_any_figure(monkeypatch, curves, logged):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    drawn = []  # (text, its box) of every text drawn: ticks outside the view are not
    real_draw = mpl_text().draw

    def draw(self, renderer):
        real_draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self.get_text(), self.get_window_extent(renderer)))
    monkeypatch.setattr(mpl_text(), "draw", draw)
    for reports in (curves, logged):
        _, figures = _figures(monkeypatch, reports)
        for fig in figures:
            drawn.clear()
            fig.draw(FigureCanvasAgg(fig).get_renderer())  # laid out as savefig does
            clash = [(a, b) for i, (a, ba) in enumerate(drawn) for b, bb in drawn[i + 1:]
                     if ba.shrunk(0.98, 0.9).overlaps(bb.shrunk(0.98, 0.9))]
            assert clash == [], clash


def test_heatmap_of_an_all_zero_tensor_says_so_instead_of_empty_axes():
    mpl = pytest.importorskip("matplotlib")
    import dataclasses

    import matplotlib.figure
    from torchhealth.html_report import _params
    from torchhealth.report_plots import heatmap
    reports = train_with_scalars(steps=3, nan_at=None)
    dead = [dataclasses.replace(r, rows=[dataclasses.replace(w, hist={}, zero=w.numel) for w in r.rows])
            for r in reports]  # histograms measured: every value zero
    ax = matplotlib.figure.Figure().subplots()
    assert heatmap(mpl, ax, _params(dead)["0.weight"].rows["grad"], "0.weight: gradient") is None
    assert [t.get_text() for t in ax.texts] == ["no finite nonzero values\n(all zero or non-finite at every step)"]
    assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []


# -- which heatmaps: the worst N, or names and glob patterns --------------------------------------
@pytest.fixture(scope="module")
def short_run():
    """Five checks with histograms of a 7-layer MLP: 0.weight ... 12.bias."""
    return train_with_scalars(steps=5, nan_at=None, depth=6)


def _heatmap_titles(figures) -> list[str]:
    return [ax.get_title() for f in figures for ax in f.axes if ax.get_title().endswith(": gradient")]


@pytest.mark.parametrize("heatmaps, names", [
    (["12.weight", "1?.bias"], ["12.weight", "10.bias", "12.bias"]),  # in the order asked, each once
    ("[02].weight", ["0.weight", "2.weight"]),
    (["4.bias", "4.*"], ["4.bias", "4.weight"]),
])
def test_heatmaps_of_the_parameters_asked_for(monkeypatch, short_run, heatmaps, names):
    pytest.importorskip("matplotlib")
    figures = _capture_figures(monkeypatch)
    page = render(short_run, heatmaps=heatmaps)
    assert _heatmap_titles(figures) == [f"{n}: gradient" for n in names]
    assert f'alt="log2-magnitude histograms over steps: {", ".join(names)}"' in page
    assert "for the parameters asked for" in page


def test_heatmaps_of_the_worst_n(monkeypatch, short_run):
    pytest.importorskip("matplotlib")
    figures = _capture_figures(monkeypatch)
    render(short_run, heatmaps=2)
    assert len(_heatmap_titles(figures)) == 2
    figures.clear()
    page = render(short_run, heatmaps=0)
    assert _heatmap_titles(figures) == [] and "No heatmap was asked for (heatmaps=0)" in page
    assert "Histograms were not recorded" not in page


def test_too_many_heatmaps_are_cut_with_a_note(monkeypatch, short_run):
    pytest.importorskip("matplotlib")
    from torchhealth import html_report
    monkeypatch.setattr(html_report, "MAX_HEATMAPS", 3)
    figures = _capture_figures(monkeypatch)
    page = render(short_run, heatmaps="*")
    assert _heatmap_titles(figures) == ["0.weight: gradient", "0.bias: gradient", "2.weight: gradient"]
    assert "14 parameters chosen; the first 3 are drawn" in page


@pytest.mark.parametrize("heatmaps, error, words", [
    (["2.weight", "2.wieght"], ValueError, "no parameter matches the heatmap pattern '2.wieght'; "
                                           "close names: 2.weight"),
    ("encoder.*", ValueError, "no parameter matches the heatmap pattern 'encoder.*'; the names are "
                              "like 0.weight, 0.bias, 2.weight, 2.bias, 4.weight, ..."),
    (-1, ValueError, "heatmaps must be >= 0"),
    (True, TypeError, "heatmaps must be a number of parameters or names"),
    ([3], TypeError, "a pattern must be a non-empty string, got 3"),
])
def test_bad_heatmap_choices_are_clear_errors(short_run, heatmaps, error, words):
    with pytest.raises(error) as e:
        render(short_run, heatmaps=heatmaps)
    assert words in str(e.value)


def test_a_nan_loss_is_marked_on_its_curve(monkeypatch, curves):
    pytest.importorskip("matplotlib")
    page, figures = _figures(monkeypatch, curves)
    loss = next(ax for f in figures for ax in f.axes if ax.get_title() == "loss")
    assert math.isnan(curves[20].scalars["loss"])  # the NaN step
    marks = [c.get_offsets()[:, 0].tolist() for c in loss.collections]
    assert marks == [[20.0]] and loss.get_legend().get_texts()[0].get_text() == "nan (step 20)"
    lr = next(ax for f in figures for ax in f.axes if ax.get_title() == "lr")
    assert len(lr.collections) == 0 and lr.get_legend() is None  # nothing to mark there
    assert 'alt="training curves: loss, lr"' in page
