"""The HTML report, built from a real logged training run."""
import base64
import io
import math
import re
import sys

import pytest

from torchhealth.html_report import LIMITS, render, write_report
from torchhealth.sinks import JsonlSink, read_jsonl

from logged_run import train


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run written to a JSON Lines log and read back, as `torchhealth report` does."""
    path = tmp_path_factory.mktemp("run") / "run.jsonl"
    with JsonlSink(path) as sink:
        train(steps=40, nan_at=30, on_report=sink)
    return read_jsonl(path)


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
    from torchhealth.html_report import _heatmap, _params
    params = _params(logged)
    ax = matplotlib.figure.Figure().subplots()
    mesh = _heatmap(mpl, ax, params["0.weight"].rows["grad"], "0.weight: gradient")
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
