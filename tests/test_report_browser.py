"""The HTML report in a real browser: headless Chromium (a distribution package;
`.ci/run` installs it) loads the file with the network off, and the page must
render with no console message or page error and every figure visible. The
screenshots of each demo scenario's report go to ``artifacts/report-screenshots``
(git-ignored) to be looked at. Skips when Chromium is not installed."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from torchhealth.html_report import write_report

from curves_run import train_with_scalars

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "report-screenshots"
BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = [pytest.mark.skipif(BROWSER is None, reason="headless Chromium is not installed"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# Runs before the page's own content: records page errors (scripts, images that
# fail to load) and console calls, then after the load event what every figure
# looks like, as JSON in a <pre id="probe"> that --dump-dom prints.
PROBE = """<script>
const probe = {errors: [], figures: []};
addEventListener("error", e => probe.errors.push(String(e.message || (e.target && e.target.src || "").slice(0, 40))), true);
for (const k of ["error", "warn", "log"]) { const f = console[k]; console[k] = (...a) => { probe.errors.push(k + ": " + a.join(" ")); f(...a); }; }
addEventListener("load", () => {
  for (const img of document.images) { const r = img.getBoundingClientRect(); const s = getComputedStyle(img);
    probe.figures.push({alt: img.alt, box: [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY],
      complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
      shown: [r.width, r.height], visible: s.display !== "none" && s.visibility !== "hidden" && r.width > 0 && r.height > 0}); }
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(probe);
  document.body.appendChild(pre);
});
</script>"""


WINDOW = "--window-size=1320,9000"  # the same layout for the probe and the screenshot


def _chromium(tmp_path, page: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network: every fetch fails
         *args, page.as_uri()], capture_output=True, text=True, timeout=60)


def load(tmp_path, report: Path) -> dict:
    """The probe's findings for `report`, loaded in headless Chromium."""
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1),
                      encoding="utf-8")
    p = _chromium(tmp_path, probed, "--dump-dom", "--virtual-time-budget=5000", WINDOW)
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', p.stdout, re.DOTALL)
    assert m, f"the page did not finish loading: {p.stderr[-2000:]}"
    out = json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    out["console"] = [line for line in p.stderr.splitlines() if ":CONSOLE" in line]
    return out


def screenshot(tmp_path, report: Path, out: Path):
    """A full-width screenshot of `report` (PIL image), cropped to the page."""
    PIL = pytest.importorskip("PIL.Image")
    out.parent.mkdir(parents=True, exist_ok=True)
    p = _chromium(tmp_path, report, f"--screenshot={out}", WINDOW)
    assert p.returncode == 0 and out.exists(), p.stderr[-2000:]
    img = PIL.open(out).convert("RGB")
    bg = PIL.new("RGB", img.size, (255, 255, 255))
    from PIL import ImageChops
    box = ImageChops.difference(img, bg).getbbox()
    img = img.crop((0, 0, img.width, min(img.height, box[3] + 16)))
    img.save(out)
    return img


def assert_renders(tmp_path, report: Path, figures: int) -> dict:
    seen = load(tmp_path, report)
    assert seen["errors"] == [] and seen["console"] == []
    assert len(seen["figures"]) == figures
    for f in seen["figures"]:
        assert f["complete"] and f["visible"] and f["natural"][0] > 400 and f["natural"][1] > 100, f
        assert f["shown"][0] > 300  # scaled to the page, not collapsed
    return seen


def _near(img, rgb, tolerance=40) -> int:
    """How many pixels of `img` are within `tolerance` of the colour `rgb`."""
    return sum(n for n, c in img.getcolors(maxcolors=1 << 24) if sum(abs(a - b) for a, b in zip(c, rgb)) <= tolerance)


def test_report_renders_in_a_browser(tmp_path):
    pytest.importorskip("matplotlib")
    reports = train_with_scalars(steps=40, nan_at=30, depth=6)  # 14 parameters: a colour bar of names
    out = write_report(reports, tmp_path / "report.html", source="run.jsonl")
    seen = assert_renders(tmp_path, out, figures=4)  # curves, norms, heatmaps, timeline
    img = screenshot(tmp_path, out, SHOTS / "logged-run.png")
    assert img.height > 2000  # the whole page, every figure in it
    # The loss/lr panel comes first, and on screen it holds both curves (blue) and,
    # for the NaN loss at step 30, the fault line and the NaN mark (red).
    curves = seen["figures"][0]
    assert curves["alt"] == "training curves: loss, lr"
    panel = img.crop(tuple(round(x) for x in curves["box"]))
    panel.save(SHOTS / "logged-run-curves.png")
    assert panel.height > 200 and _near(panel, (31, 119, 180)) > 1000 and _near(panel, (214, 39, 40)) > 20
    alts = [f["alt"] for f in seen["figures"][1:]]
    assert alts[0] == "gradient and weight norms per parameter" and alts[2] == "timeline of the checks that fired"
    assert alts[1].startswith("log2-magnitude histograms over steps: ")


@pytest.mark.parametrize("scenario", ["nan", "lr", "vanishing", "fp16", "dead", "relu"])
def test_demo_reports_render_in_a_browser(tmp_path, scenario):
    pytest.importorskip("matplotlib")
    from torchhealth import demo
    out = write_report(demo.run(scenario), tmp_path / "report.html", source=f"demo {scenario}")
    page = out.read_text(encoding="utf-8")
    assert_renders(tmp_path, out, figures=page.count("<img "))
    screenshot(tmp_path, out, SHOTS / f"demo-{scenario}.png")
