"""pytest plugin (``pytest11`` entry point ``torchhealth.testing.plugin``).

Fixtures: ``torchhealth_check`` (`check_model` that raises an
`AssertionError` listing every failed check) and the synthetic data of
`torchhealth.testing.data` at its defaults: ``torchhealth_blobs``,
``torchhealth_sines``, ``torchhealth_images``, ``torchhealth_sequences``,
``torchhealth_tokens``. When a test fails, every `SanityReport` it made is
printed in a "torchhealth" section of the failure. Torch is imported only when
a fixture is used, so the plugin costs nothing to projects that do not use it.
"""
from __future__ import annotations

import pytest

_REPORTS = pytest.StashKey[list]()


def _data_fixture(name: str, doc: str):
    def fixture():
        from . import data
        return getattr(data, name)()

    fixture.__doc__ = doc
    return pytest.fixture(name=f"torchhealth_{name}")(fixture)


torchhealth_blobs = _data_fixture("blobs", "`data.blobs()`: 300 points, 2 features, 3 balanced "
                                  "Gaussian blobs.")
torchhealth_sines = _data_fixture("sines", "`data.sines()`: 256 samples of a noisy sum of sines "
                                  "and cosines.")
torchhealth_images = _data_fixture("images", "`data.images()`: 64 NCHW 3x16x16 images, the label "
                                   "is the spot's position.")
torchhealth_sequences = _data_fixture("sequences", "`data.sequences()`: 128 sequences of 12 "
                                      "steps, 4 features, 2 classes.")
torchhealth_tokens = _data_fixture("tokens", "`data.tokens()`: 128 token sequences of length 12, "
                                   "vocabulary 16, 2 classes.")


@pytest.fixture
def torchhealth_check(request):
    """``torchhealth_check(model, batch, loss_fn, **kwargs)``: `check_model`
    with the same arguments; raises an `AssertionError` listing every failed
    check, else returns the `SanityReport`."""
    from .suite import check_model

    reports = request.node.stash.setdefault(_REPORTS, [])

    def run(model, batch, loss_fn, **kwargs):
        report = check_model(model, batch, loss_fn, **kwargs)
        reports.append(report)
        return report.raise_if_failed()

    return run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if call.when == "call" and rep.failed:
        for report in item.stash.get(_REPORTS, []):
            rep.sections.append(("torchhealth", str(report)))
