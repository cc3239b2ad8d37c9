"""Devices and dtypes every correctness test runs over, defined once."""
import pytest
import torch

import torchhealth

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture(params=[pytest.param(d, marks=pytest.mark.cuda) if d == "cuda" else d
                        for d in ["cpu", "cuda"]])
def device(request):
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _extension_is_built():
    # The suite tests the kernels; running it silently on the fallback would
    # test the reference against itself.
    assert torchhealth.backend().name == "extension", torchhealth.backend().reason
