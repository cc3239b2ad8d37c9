"""Outputs large enough for the CPU op to map them itself (csrc/cpu/output_alloc.h):
the same rows as any other output, a tensor like any other (freed, cloned,
saved, resized, shared), and the memory of a freed one reused, zero-filled."""
import gc
import io
import sys

import pytest
import torch

import torchhealth
from torchhealth import reference
from torchhealth import stats as S
from helpers import assert_rows_agree

pytestmark = pytest.mark.skipif(torchhealth.backend().name != "extension",
                                reason="the compiled extension is not built")

HUGE_PAGE = 2 << 20
ROW_BYTES = (S.COLS + S.BINS) * 8
MAPPED_ROWS = (32 << 20) // ROW_BYTES + 100  # outputs from 32 MiB are mapped


def _inputs(n: int, seed: int) -> list[torch.Tensor]:
    """n tiny tensors of several dtypes with special values, and two spanning
    several chunks (their histograms are added by several threads)."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    ts = []
    for i in range(n):
        t = torch.randn(int(torch.randint(1, 64, (1,), generator=g)), generator=g,
                        dtype=torch.float64) * 10.0 ** (i % 9 - 4)
        if i % 11 == 0:
            t[0] = [float("nan"), float("inf"), -0.0, 1e-42][i % 4]
        ts.append(t.to(dtypes[i % 4]))
    ts[n // 3] = torch.randn(200_000, generator=g)
    ts[n // 2] = torch.randn(3, 70_000, generator=g, dtype=torch.float64).t()  # permuted
    return ts


@pytest.fixture(scope="module", params=[MAPPED_ROWS, 2000], ids=["mapped", "allocator"])
def case(request):
    ts = _inputs(request.param, seed=request.param)
    return ts, torchhealth.tensor_stats(ts, histogram=True).data


def _is_mapped(out: torch.Tensor) -> bool:
    return out.data_ptr() % HUGE_PAGE == 0


def test_large_output_starts_on_a_huge_page_on_linux(case):
    ts, out = case
    if not sys.platform.startswith("linux"):
        pytest.skip("outputs are mapped on Linux only")
    assert _is_mapped(out) == (len(ts) >= MAPPED_ROWS)


def test_rows_match_the_reference_and_the_histogram_free_call(case):
    ts, out = case
    assert out.shape == (len(ts), S.COLS + S.BINS) and out.dtype == torch.int64
    assert torch.equal(out[:, :S.COLS], torchhealth.tensor_stats(ts, histogram=False).data)
    # Rows are independent: a sample (with both multi-chunk tensors) against the reference.
    rows = sorted(set(range(0, len(ts), 97)) | {len(ts) // 3, len(ts) // 2, len(ts) - 1})
    sample = [ts[i] for i in rows]
    assert_rows_agree(out[rows], reference.tensor_stats(sample, True, None), sample, "sample")


def test_bins_nothing_was_counted_in_are_zero(case):
    ts, out = case
    counted = out[:, S.NUMEL] - out[:, S.NAN] - out[:, S.POSINF] - out[:, S.NEGINF] - out[:, S.ZERO]
    assert torch.equal(out[:, S.COLS:].sum(1), counted)
    assert (out[:, S.COLS:] >= 0).all()
    # A tensor of a few values touches a few bins; every other bin of its row is zero.
    assert ((out[:, S.COLS:] != 0).sum(1) <= out[:, S.NUMEL]).all()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_mapped_outputs_are_freed():
    ts = [torch.randn(3) for _ in range(MAPPED_ROWS)]
    torchhealth.tensor_stats(ts)
    gc.collect()
    before = _resident_bytes()
    for _ in range(12):  # 12 leaked outputs would hold over 400 MB
        out = torchhealth.tensor_stats(ts).data
        out[-1, 0].item()
        del out
    gc.collect()
    assert _resident_bytes() - before < 100 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_freed_output_is_kept_and_the_next_one_gets_it_zero_filled():
    first, second = _inputs(MAPPED_ROWS, seed=3), _inputs(MAPPED_ROWS, seed=4)
    out = torchhealth.tensor_stats(first).data
    ptr = out.data_ptr()
    gc.collect()
    held = _resident_bytes()
    del out
    gc.collect()
    # Kept: its ~33 MB stay resident (given back to the system, they would not).
    assert held - _resident_bytes() < 4 << 20
    again = torchhealth.tensor_stats(second).data
    assert again.data_ptr() == ptr
    # Zero-filled: nothing of the first call's counts remains in its bins.
    assert torch.equal(again[:, :S.COLS], torchhealth.tensor_stats(second, histogram=False).data)
    counted = again[:, S.NUMEL] - again[:, S.NAN] - again[:, S.POSINF] - again[:, S.NEGINF] - again[:, S.ZERO]
    assert torch.equal(again[:, S.COLS:].sum(1), counted)
    sample = [second[i] for i in range(0, len(second), 211)]
    assert_rows_agree(again[::211], reference.tensor_stats(sample, True, None), sample, "sample")


def test_survives_clone_save_views_set_resize_and_share(case):
    ts, out = case
    want = out.clone()
    assert want.data_ptr() != out.data_ptr() and torch.equal(want, out)
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), want)

    fresh = torchhealth.tensor_stats(ts).data
    last_row = fresh[-1]
    alias = torch.empty(0, dtype=torch.int64).set_(fresh)
    array = fresh.numpy()
    del fresh
    gc.collect()
    assert torch.equal(last_row, want[-1]) and torch.equal(alias, want)
    assert (array[:, :S.COLS] == want[:, :S.COLS].numpy()).all()
    del alias, array, last_row

    grown = torchhealth.tensor_stats(ts).data
    grown.resize_(len(ts) + 50, S.COLS + S.BINS)  # moves to memory of its own
    assert torch.equal(grown[:len(ts)], want)
    grown.resize_(3, S.COLS + S.BINS)
    assert torch.equal(grown, want[:3])

    shared = torchhealth.tensor_stats(ts).data
    shared.share_memory_()
    assert shared.is_shared() and torch.equal(shared, want)
