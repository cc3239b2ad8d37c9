"""The pytest plugin, run in a fresh pytest session with pytester."""
import pathlib
import re

import pytest
import torch

import torchhealth.testing

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True, scope="module")
def _torch_imports_done():
    # pytester's in-process runs drop the modules first imported during a run;
    # torch registers operator libraries on import and cannot do it twice, so
    # whatever the suite imports lazily (torch._dynamo, through the optimizer)
    # is imported here, before any run.
    torchhealth.testing.check_model(torch.nn.Linear(2, 2), torch.ones(4, 2),
                                    lambda out: out.square().mean(), overfit_steps=1)

PLUGIN = "torchhealth.testing.plugin"
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _run(pytester, monkeypatch, source):
    pytester.makepyfile(test_user=source)
    # Only this plugin, whether or not its entry point is installed: the other
    # installed plugins would be imported again by every in-process run.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return pytester.runpytest("-p", PLUGIN, "-p", "no:cacheprovider")


def test_readme_test_file_passes(pytester, monkeypatch):
    section = README.read_text().split("## Model sanity tests", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(source.strip().splitlines()) <= 5, source
    _run(pytester, monkeypatch, source).assert_outcomes(passed=1)


def test_a_failing_check_prints_the_report(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, """
import torch
from torch import nn

def test_frozen_by_accident(torchhealth_check, torchhealth_blobs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))
    model[2].requires_grad_(False)
    torchhealth_check(model, torchhealth_blobs.batch(32), nn.CrossEntropyLoss(), classes=3)
""")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "sanity check(s) failed for Sequential (params_update" in out
    assert "2 has requires_grad=False but is not listed in frozen=" in out
    # the plugin's own section of the failure, besides the assertion message
    assert re.search(r"-{3,} torchhealth -{3,}\nSanityReport of Sequential: \d failed", out), out


def test_data_fixtures_are_the_synthetic_data_at_their_defaults(pytester, monkeypatch):
    _run(pytester, monkeypatch, """
import torch
from torchhealth.testing import data

def test_fixtures(torchhealth_blobs, torchhealth_sines, torchhealth_images,
                  torchhealth_sequences, torchhealth_tokens):
    for got, want in [(torchhealth_blobs, data.blobs()), (torchhealth_sines, data.sines()),
                      (torchhealth_images, data.images()), (torchhealth_sequences, data.sequences()),
                      (torchhealth_tokens, data.tokens())]:
        assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
""").assert_outcomes(passed=1)
