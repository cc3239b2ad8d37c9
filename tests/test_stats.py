"""Correctness of tensor_stats against the pure-PyTorch reference."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchhealth
from torchhealth import reference
from torchhealth import stats as S
from torchhealth.stats import TensorStats

from helpers import assert_matches_reference, planted, specials

CHUNK = 1 << 16  # csrc/validation.h kChunk: where parallel partial results meet


def make(values, dtype, device="cpu"):
    return torch.tensor(values, dtype=torch.float64).to(dtype).to(device)


# --- layout and semantics on hand-checked values --------------------------------

def test_each_count_lands_in_its_named_field(dtype, device):
    fi = torch.finfo(dtype)
    sub = fi.smallest_normal / 4
    x = make([math.nan, math.nan, math.inf, -math.inf, -math.inf, -math.inf, 0.0, -0.0, sub,
              -sub, fi.max, 1.0, -2.5], dtype, device)
    s = torchhealth.tensor_stats([x])
    assert s.numel.tolist() == [13]
    assert s.nan.tolist() == [2]
    assert s.posinf.tolist() == [1]
    assert s.neginf.tolist() == [3]
    assert s.zero.tolist() == [2]
    assert s.subnormal.tolist() == [2]
    assert s.saturated.tolist() == [1]
    assert s.min.tolist() == [-2.5]
    assert s.max.tolist() == [fi.max]
    assert s.absmax.tolist() == [fi.max]
    assert s.sum.item() == pytest.approx(fi.max - 1.5, rel=1e-12)
    assert s.hist.sum().item() == 13 - 2 - 4 - 2  # finite nonzero values


def test_histogram_columns_follow_histogram_bins(dtype):
    bins = torchhealth.histogram_bins()
    fi = torch.finfo(dtype)
    vals = [1.0, -1.0, 1.5, 3.0, -0.75, fi.smallest_normal, fi.max, -fi.smallest_normal * fi.eps]
    for v in vals:
        s = torchhealth.tensor_stats([make([v], dtype)])
        (col,) = s.hist[0].nonzero().flatten().tolist()
        assert bins.sign[col] == (1 if v > 0 else -1)
        assert bins.lo[col] <= abs(v) < bins.hi[col], (v, col)
        if 0 < bins.lo[col] and bins.hi[col] < math.inf:
            assert bins.hi[col] == 2 * bins.lo[col]
            assert bins.lo[col] == 2.0 ** bins.exponent[col].item()


def test_histogram_end_bins_take_float64_extremes():
    bins = torchhealth.histogram_bins()
    x = make([2.0**-150, -(2.0**-1074), 2.0**128, -1e308, 2.0**-149, 2.0**127], torch.float64)
    h = torchhealth.tensor_stats([x]).hist[0]
    under_pos, over_pos = S.BINS_PER_SIGN, S.BINS - 1
    assert h[under_pos] == 1 and h[0] == 1 and h[over_pos] == 1 and h[S.BINS_PER_SIGN - 1] == 1
    assert h[S.BINS_PER_SIGN + 1] == 1 and h[over_pos - 1] == 1  # 2^-149 and 2^127: regular bins
    assert bins.lo[0] == 0 and bins.hi[S.BINS - 1] == math.inf
    assert int(h.sum()) == 6


def test_no_finite_value_gives_merge_identities(dtype):
    for x in [make([], dtype), make([math.nan, math.inf], dtype)]:
        s = torchhealth.tensor_stats([x])
        assert s.min.tolist() == [math.inf] and s.max.tolist() == [-math.inf]
        assert s.absmax.tolist() == [0.0] and s.sum.tolist() == [0.0] and s.sumsq.tolist() == [0.0]


def test_negative_zero_is_reported_as_positive_zero(dtype):
    s = torchhealth.tensor_stats([make([-0.0, -0.0], dtype)])
    assert math.copysign(1.0, s.min.item()) == 1.0
    assert math.copysign(1.0, s.max.item()) == 1.0
    assert s.zero.item() == 2 and s.hist.sum().item() == 0


def test_saturation_threshold_default_and_absolute(dtype):
    fi = torch.finfo(dtype)
    x = make([fi.max / 2, -fi.max / 2, fi.max / 4, 100.0, -100.0, 99.0, math.inf], dtype)
    assert torchhealth.tensor_stats([x]).saturated.item() == 2
    assert torchhealth.tensor_stats([x], saturation=100.0).saturated.item() == 5
    # A threshold between two representable values rounds in the right direction.
    assert torchhealth.tensor_stats([x], saturation=99.5).saturated.item() == 5
    assert_matches_reference([x], saturation=99.5)
    assert_matches_reference([x], saturation=1e-30)


def test_float16_saturation_default_is_half_of_65504():
    x = make([32752.0, 32736.0, 65504.0, -40000.0], torch.float16)
    assert torchhealth.tensor_stats([x]).saturated.item() == 3


# --- against the reference --------------------------------------------------------

@pytest.mark.parametrize("histogram", [True, False])
def test_random_with_specials(dtype, device, histogram):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g, dtype=torch.float64) * 0.02
    sp = make(specials(dtype), torch.float64)
    x[torch.randint(0, x.numel(), (sp.numel(),), generator=g)] = sp
    t = x.to(dtype).to(device)
    got = assert_matches_reference([t, t * 1000, t[:7]], histogram=histogram)
    assert got.shape[1] == S.COLS + (S.BINS if histogram else 0)


@pytest.mark.parametrize("dtype16", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_every_16_bit_pattern(dtype16, device):
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype16)
    assert_matches_reference([x.to(device)])


def test_random_bit_patterns_32_and_64(device):
    g = torch.Generator().manual_seed(1)
    f32 = torch.randint(-(1 << 31), 1 << 31, (300_000,), generator=g, dtype=torch.int64)
    f32 = f32.to(torch.int32).view(torch.float32)
    f64 = torch.randint(-(1 << 62), 1 << 62, (300_000,), generator=g, dtype=torch.int64) * 2
    f64 = f64.view(torch.float64)
    # Also the float32 subnormal range, where the bin comes from the mantissa.
    sub = torch.randint(1, 1 << 23, (100_000,), generator=g, dtype=torch.int32).view(torch.float32)
    assert_matches_reference([f32.to(device), f64.to(device), sub.to(device), -sub.to(device)])


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_sizes_at_chunk_boundaries(dtype, device, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    if n:
        sp = make(specials(dtype), dtype)
        for pos in {0, n - 1, min(n - 1, CHUNK - 1), min(n - 1, CHUNK), n // 2}:
            x[pos] = sp[pos % sp.numel()]
    assert_matches_reference([x.to(device)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_specials_anywhere(data):
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    n = data.draw(st.sampled_from([1, 3, 64, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3]))
    edges = [0, n - 1, CHUNK - 1, CHUNK, 2 * CHUNK - 1, 2 * CHUNK]
    positions = data.draw(st.lists(st.one_of(st.sampled_from(edges), st.integers(0, n - 1)),
                                   max_size=12))
    values = data.draw(st.lists(st.sampled_from(specials(dtype)), min_size=len(positions),
                                max_size=len(positions)))
    scale = data.draw(st.sampled_from([1e-6, 0.02, 1.0, 1e3]))
    offset = data.draw(st.integers(0, 3))  # unaligned starts
    x = planted(dtype, n, offset, scale, positions, values, seed=n)
    sat = data.draw(st.sampled_from([None, 1.0, 3e4]))
    assert_matches_reference([x], saturation=sat)


def test_many_tiny_tensors_mixed_dtypes(device):
    g = torch.Generator().manual_seed(2)
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    ts = []
    for i in range(1200):
        shape = [(), (0,), (1,), (3, 5), (int(torch.randint(1, 40, (1,), generator=g)),)][i % 5]
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if t.numel() and i % 7 == 0:
            t.view(-1)[0] = [math.nan, math.inf, -0.0, 1e-40][i % 4]
        ts.append(t.to(dtypes[i % 4]).to(device))
    got = assert_matches_reference(ts)
    assert got[:, S.NUMEL].tolist() == [t.numel() for t in ts]


def test_views_and_layouts(dtype, device):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=g, dtype=torch.float64).to(dtype).to(device)
    base[5, 7] = math.nan
    base[0, 0] = -math.inf
    img = torch.randn(2, 3, 5, 7, generator=g).to(dtype).to(device)
    views = [
        base.t(),                                   # transposed, dense
        base[1:, 3:],                               # offset, strided
        base.view(-1)[5:],                          # offset, contiguous, unaligned
        base[::2, ::3],                             # strided slice
        base[:, 5],                                 # column
        base.permute(1, 0)[2:10],                   # permuted then sliced
        img.to(memory_format=torch.channels_last),  # dense, not contiguous
        base[3, 4],                                 # 0-d view
        base[0].expand(3, 48),                      # overlapping (stride 0)
        base.unsqueeze(0)[:, :0],                   # empty view
    ]
    got = assert_matches_reference(views)
    assert got[:, S.NUMEL].tolist() == [v.numel() for v in views]


def test_reads_tensors_that_require_grad_without_autograd():
    w = torch.randn(100, requires_grad=True)
    y = w * 2  # non-leaf with grad_fn
    s = torchhealth.tensor_stats([w, y])
    assert not s.data.requires_grad and s.data.grad_fn is None
    assert s.max[1].item() == pytest.approx(2 * s.max[0].item())


def test_deterministic():
    x = torch.randn(5 * CHUNK + 17) * 1e3
    a = torchhealth.tensor_stats([x, x[1:]]).data
    for _ in range(3):
        assert torch.equal(torchhealth.tensor_stats([x, x[1:]]).data, a)


def test_more_than_2_31_elements():
    n = (1 << 31) + 3
    x = torch.zeros(n, dtype=torch.float16)
    x[-1] = math.nan
    x[(1 << 31) - 1] = -math.inf
    x[1 << 31] = 3.0
    x[5] = -2.0
    s = torchhealth.tensor_stats([x])
    assert s.numel.item() == n
    assert (s.nan.item(), s.neginf.item(), s.zero.item()) == (1, 1, n - 4)
    assert (s.min.item(), s.max.item(), s.sum.item()) == (-2.0, 3.0, 1.0)
    assert s.hist.sum().item() == 2


# --- TensorStats ------------------------------------------------------------------

def test_total_and_merge_are_exact_combinations(dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3 * CHUNK + 11, generator=g, dtype=torch.float64) * 5).to(dtype)
    x[100] = math.nan
    x[CHUNK * 2] = -math.inf
    parts = [x[:1000], x[1000:CHUNK + 3], x[CHUNK + 3:]]
    whole = torchhealth.tensor_stats([x]).data
    total = torchhealth.tensor_stats(parts).total().data
    exact = [c for c in range(total.shape[1]) if c not in (S.SUM, S.SUMSQ)]
    assert torch.equal(total[:, exact], whole[:, exact])
    a = torchhealth.tensor_stats([x[:500], x[1:]])
    b = torchhealth.tensor_stats([x[500:], x[:1]])
    merged = a.merge(b).data
    assert torch.equal(merged[0, exact], whole[0, exact])
    assert torch.equal(merged[1, exact], whole[0, exact])
    # Sums of differently split data are each within the documented bound of
    # the exact sum (the kernels add short float32 partials, so sums of
    # different splits need not agree to the last bits).
    finite = x.double().nan_to_num(0, 0, 0)
    exact, bound = math.fsum(finite.tolist()), S.SUM_RTOL * finite.abs().sum().item()
    for got in (merged[0, S.SUM], merged[1, S.SUM], whole[0, S.SUM], total[0, S.SUM]):
        assert abs(got.view(torch.float64).item() - exact) <= bound


def test_total_of_nothing_is_the_identity():
    t = torchhealth.tensor_stats([]).total()
    assert len(t) == 1 and t.numel.item() == 0 and t.min.item() == math.inf
    assert t.hist.sum().item() == 0


def test_derived_fields():
    x = torch.tensor([3.0, -4.0, math.nan, 0.0])
    s = torchhealth.tensor_stats([x, torch.tensor([])])
    assert s.l2norm[0].item() == 5.0
    assert s.finite.tolist() == [3, 0] and s.nonfinite.tolist() == [1, 0]
    assert s.nonfinite_fraction.tolist() == [0.25, 0.0]
    assert s.mean[0].item() == pytest.approx(-1 / 3)
    assert s.rms[0].item() == pytest.approx(math.sqrt(25 / 3))
    assert math.isnan(s.mean[1].item())
    assert s.magnitude_hist.shape == (2, S.BINS_PER_SIGN) and s.magnitude_hist[0].sum() == 2
    assert len(s[0]) == 1 and s[1].numel.item() == 0
    assert len(TensorStats.cat([s, s[0]])) == 3


def test_without_histogram_has_no_hist():
    s = torchhealth.tensor_stats([torch.ones(3)], histogram=False)
    assert s.hist is None and not s.has_histogram and s.magnitude_hist is None


# --- bad input --------------------------------------------------------------------

@pytest.mark.parametrize("bad, exc, words", [
    (torch.arange(3), TypeError, ["tensors[1]", "torch.int64", "float16"]),
    (torch.tensor([True]), TypeError, ["tensors[1]", "torch.bool"]),
    (torch.randn(2, dtype=torch.complex64), TypeError, ["tensors[1]", "complex64"]),
    (torch.randn(2, 2).to_sparse(), ValueError, ["tensors[1]", "sparse", "layout"]),
    (lambda: torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8), TypeError,
     ["tensors[1]", "quantized"]),
    (torch.empty(3, device="meta"), ValueError, ["tensors[1]", "meta"]),
    ([1.0, 2.0], TypeError, ["tensors[1]", "list", "not a tensor"]),
])
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_bad_tensor_is_named(bad, exc, words):
    bad = bad() if callable(bad) else bad
    with pytest.raises(exc) as e:
        torchhealth.tensor_stats([torch.ones(2), bad])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("arg", [torch.ones(3), (t for t in [torch.ones(3)]), None, "x"])
def test_non_list_argument(arg):
    with pytest.raises(TypeError, match="list or tuple"):
        torchhealth.tensor_stats(arg)


def test_bad_options():
    with pytest.raises(ValueError, match="saturation"):
        torchhealth.tensor_stats([torch.ones(2)], saturation=0.0)
    with pytest.raises(ValueError, match="saturation"):
        torchhealth.tensor_stats([torch.ones(2)], saturation=float("nan"))
    with pytest.raises(TypeError, match="saturation"):
        torchhealth.tensor_stats([torch.ones(2)], saturation="1")
    with pytest.raises(TypeError, match="histogram"):
        torchhealth.tensor_stats([torch.ones(2)], histogram=1)


def test_op_itself_checks_its_inputs():
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int32"):
        torch.ops.torchhealth.tensor_stats([torch.ones(2), torch.ones(2, dtype=torch.int32)])
    with pytest.raises(ValueError, match="saturation must be a positive"):
        torch.ops.torchhealth.tensor_stats([torch.ones(2)], True, -1.0)


@pytest.mark.parametrize("tensors, saturation", [
    ([torch.ones(2), torch.arange(3)], None),
    ([torch.ones(2), torch.ones(2, dtype=torch.bool)], None),
    ([torch.ones(2), torch.ones(2, dtype=torch.uint16)], None),
    ([torch.ones(2), torch.ones(2, dtype=torch.float8_e4m3fnuz)], None),
    ([torch.ones(2), torch.ones(2, dtype=torch.complex128)], None),
    ([torch.ones(2)], -1.0),
    ([torch.ones(2)], 0.0),
    ([torch.ones(2)], float("nan")),
])
def test_both_backends_refuse_in_the_same_words(tensors, saturation):
    """The op's checks live once per language (csrc/validation.h and
    reference.check_op_inputs); both raise the same error with the same text."""
    if torchhealth.backend().name != "extension":
        pytest.skip("the compiled extension is not built")
    with pytest.raises((TypeError, ValueError)) as from_cpp:
        torch.ops.torchhealth.tensor_stats(tensors, True, saturation)
    with pytest.raises((TypeError, ValueError)) as from_python:
        reference.tensor_stats(tensors, True, saturation)
    assert type(from_cpp.value) is type(from_python.value)
    assert str(from_cpp.value).splitlines()[0] == str(from_python.value)


def test_tuple_and_empty_list():
    s = torchhealth.tensor_stats((torch.ones(2), torch.zeros(1)))
    assert s.numel.tolist() == [2, 1]
    assert len(torchhealth.tensor_stats([])) == 0


# --- operator machinery -----------------------------------------------------------

@pytest.mark.parametrize("histogram", [True, False])
def test_opcheck(histogram):
    args = ([torch.randn(5, 3), torch.randn(7).half(), torch.randn(0).double(),
             torch.randn(4, 4).t()], histogram, None)
    torch.library.opcheck(torch.ops.torchhealth.tensor_stats.default, args)
    torch.library.opcheck(torch.ops.torchhealth.tensor_stats.default,
                          ([torch.randn(9).bfloat16()], histogram, 2.0))


def test_torch_compile_fullgraph():
    def f(a, b):
        s = torchhealth.tensor_stats([a, b])
        return s.nonfinite.sum(), s.l2norm, s.hist.sum(0), s.max

    a = torch.randn(1000)
    b = torch.randn(10, 10).half()
    a[3] = math.nan
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got, want = compiled(a, b), f(a, b)
    for i in (0, 2, 3):  # the op's own outputs, reduced exactly
        assert torch.equal(got[i], want[i])
    # l2norm is a sqrt computed after the op: inductor's and eager's float64
    # sqrt may differ in the last place.
    torch.testing.assert_close(got[1], want[1], rtol=1e-15, atol=0)
    b[0, 0] = math.inf  # new data, same graph
    assert compiled(a, b)[0].item() == 2
