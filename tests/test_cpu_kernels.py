"""Every CPU chunk kernel (scalar, generic, avx2, avx512) against the reference.

tests/test_stats.py runs the kernel the CPU picks (auto: the widest). This file
switches kernels in-process with the private op torch.ops.torchhealth._cpu_kernel
and runs a compact exactness suite on each one this CPU can run; the others
skip with the reason. Specials sit at lane (8, 16), block (1024 for avx2, 2048
for avx512) and chunk (65536) edges, where the vector kernels change paths.
"""
import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchhealth
from torchhealth import reference
from torchhealth import stats as S

from helpers import assert_matches_reference, planted, specials

CHUNK = 1 << 16  # csrc/validation.h kChunk
KERNELS = ["scalar", "generic", "avx2", "avx512"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Lane, block and chunk edges of every kernel (kBlock = 128 lanes of float32,
# 64 lanes of float64, simd_kernel.h).
EDGES = [0, 7, 8, 15, 16, 17, 511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049, 3071, 4096, CHUNK - 1, CHUNK,
         CHUNK + 1, CHUNK + 1024, 2 * CHUNK - 1]

_op = torch.ops.torchhealth._cpu_kernel


def runnable(kernel: str) -> bool:
    previous = _op("")
    try:
        _op(kernel)
    except RuntimeError as e:
        assert "cannot run it" in str(e)
        return False
    finally:
        _op(previous)
    return True


@contextlib.contextmanager
def use_kernel(kernel: str):
    if not runnable(kernel):
        pytest.skip(f"this CPU cannot run the {kernel} kernel")
    previous = _op(kernel)
    try:
        yield
    finally:
        _op(previous)


kernel_param = pytest.mark.parametrize("kernel", KERNELS)


def make(values, dtype):
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def edge_values(dtype):
    """Specials plus values at the kernels' internal thresholds: the float16
    subnormal range, 2^-63 (below it the fast pass hands a float32 or bfloat16
    block to the careful pass), values far below a block's histogram window,
    and magnitudes whose square overflows float."""
    fi = torch.finfo(dtype)
    vals = specials(dtype) + [2.0**-63, -(2.0**-63), 2.0**-64, 1.5 * 2.0**-64, 2.0**-20,
                              -(2.0**-20), 2.0**-24, 3 * 2.0**-24, 1e-30, -1e-30]
    if fi.max > 1e30:
        vals += [2.0**64, -(2.0**70), 2.0**100, -(2.0**120), 1e38]
    return vals


# --- selection --------------------------------------------------------------------

def test_auto_picks_the_widest_runnable_kernel():
    widest = next(k for k in ["avx512", "avx2", "scalar"] if runnable(k))
    previous = _op("auto")
    try:
        assert _op("") == widest
    finally:
        _op(previous)


def test_unknown_kernel_name_is_an_error():
    with pytest.raises(RuntimeError, match="auto, scalar, generic, avx2 or avx512"):
        _op("sse9")


# --- exactness per kernel -------------------------------------------------------------

@kernel_param
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_specials_at_every_edge(kernel, dtype):
    with use_kernel(kernel):
        g = torch.Generator().manual_seed(10)
        n = 2 * CHUNK + 37
        base = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
        vals = make(edge_values(dtype), torch.float64)
        dense = base.clone()
        for i, pos in enumerate(EDGES):
            dense[pos] = vals[i % vals.numel()]
        # One special per block, so that every other block stays on the fast path.
        sparse = base.clone()
        for i, pos in enumerate(range(5, n, 1000)):
            sparse[pos] = vals[i % vals.numel()]
        ts = [dense.to(dtype), sparse.to(dtype), (sparse * 1e4).to(dtype)]
        for histogram in (True, False):
            assert_matches_reference(ts, histogram=histogram)
        assert_matches_reference(ts, saturation=1e-3)
        assert_matches_reference(ts, saturation=1e39)  # above float32's max


@kernel_param
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_saturation_below_the_dtype_range_in_otherwise_clean_blocks(kernel, dtype):
    """Sigmoid and tanh outputs, as watch reads them (saturation 1 - 2^-10):
    blocks whose only special values are saturated ones (counted without the
    careful pass), blocks with none, and blocks that also hold a NaN, an Inf
    or a tiny value, bit for bit against the reference."""
    with use_kernel(kernel):
        g = torch.Generator().manual_seed(11)
        n = 2 * CHUNK + 37
        z = torch.randn(n, generator=g, dtype=torch.float64)
        mixed = torch.sigmoid(z * torch.where(torch.arange(n) % 5000 < 2500, 1.0, 8.0))
        mixed[[7, 40_000]] = 1.0  # exactly at an asymptote
        specials = mixed.clone()
        specials[[100, 20_000, 70_000, 90_000]] = torch.tensor([math.nan, math.inf, 1e-30, -math.inf],
                                                                dtype=torch.float64)
        ts = [mixed.to(dtype), specials.to(dtype), torch.tanh(3 * z).to(dtype)[3:]]
        for histogram in (True, False):
            got = assert_matches_reference(ts, saturation=1 - 2.0 ** -10, histogram=histogram)
            assert got[0, S.SATURATED] > 1000  # the case the test is about


@kernel_param
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_histogram_window_edges(kernel, dtype):
    """Blocks whose magnitudes span more than the 16-exponent window, values one
    octave below it (a negative one must not alias into a positive slot), -0
    next to huge values, and blocks of a single exponent."""
    with use_kernel(kernel):
        g = torch.Generator().manual_seed(11)
        top = 2.0 ** (14 if dtype == torch.float16 else 110)
        ts = []
        for below in [15, 16, 17, 30]:  # octaves below the block's largest value
            x = torch.full((3000,), 1.5, dtype=torch.float64)
            x[::7] = top
            x[3::11] = -top / 2.0**below
            x[5::13] = top / 2.0**below
            x[9::17] = -0.0
            ts.append(x.to(dtype))
        if dtype != torch.float16:  # a clean block near the top of the range, with -0
            huge = torch.full((3000,), 2.0**120, dtype=torch.float64)
            huge[1::3] = -(2.0**112)
            huge[2::5] = -0.0
            ts.append(huge.to(dtype))
        ts.append(torch.full((2100,), -0.75, dtype=dtype))
        ts.append(torch.full((2100,), -0.0, dtype=dtype))
        wide = torch.randn(5000, generator=g, dtype=torch.float64) * torch.exp2(
            torch.randint(-40, 40, (5000,), generator=g).double())
        ts.append(wide.to(dtype))
        assert_matches_reference(ts)


@kernel_param
@pytest.mark.parametrize("dtype16", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_every_16_bit_pattern(kernel, dtype16):
    with use_kernel(kernel):
        x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype16)
        perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(12))
        assert_matches_reference([x, x[perm]])


@kernel_param
def test_random_bit_patterns(kernel):
    with use_kernel(kernel):
        g = torch.Generator().manual_seed(13)
        f32 = torch.randint(-(1 << 31), 1 << 31, (100_000,), generator=g, dtype=torch.int64)
        f32 = f32.to(torch.int32).view(torch.float32)
        sub = torch.randint(1, 1 << 23, (20_000,), generator=g, dtype=torch.int32).view(torch.float32)
        tiny = torch.randn(20_000, generator=g) * 2.0**-70  # normal, but x*x is not
        f64 = torch.randint(-(1 << 62), 1 << 62, (100_000,), generator=g, dtype=torch.int64) * 2
        f64 = f64.view(torch.float64)
        scaled = [torch.randn(20_000, generator=g, dtype=torch.float64) * 2.0**e
                  for e in (-1070, -600, -499, 0, 499, 520)]  # float64 fast-path limits
        assert_matches_reference([f32, sub, -sub, tiny, f64] + scaled)


@kernel_param
def test_many_tensors_of_every_size_in_one_call(kernel):
    """Empty, single-chunk and multi-chunk tensors of every dtype side by side:
    each kernel call sees one chunk, and chunks of one tensor add to one row."""
    with use_kernel(kernel):
        g = torch.Generator().manual_seed(14)
        sizes = [0, 1, 5, 16, 1000, 1025, CHUNK, 0, CHUNK + 1, 3, 2 * CHUNK + 9, 0]
        ts = []
        for i, n in enumerate(sizes * 3):
            t = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** (i % 5 - 2)
            if n and i % 4 == 0:
                t[n // 2] = [math.nan, math.inf, -0.0, 1e-40][i % 4]
            ts.append(t.to(DTYPES[i % 4]))
        got = assert_matches_reference(ts)
        assert got[:, S.NUMEL].tolist() == [t.numel() for t in ts]
        assert_matches_reference(ts, histogram=False)


@kernel_param
def test_property(kernel):
    with use_kernel(kernel):
        _property()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def _property(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    n = data.draw(st.sampled_from([1, 9, 17, 1023, 1025, 2047, 2049, 4100, CHUNK + 3]))
    positions = data.draw(st.lists(st.one_of(st.sampled_from(EDGES), st.integers(0, n - 1)),
                                   max_size=10))
    pool = edge_values(dtype)
    values = data.draw(st.lists(st.sampled_from(pool), min_size=len(positions),
                                max_size=len(positions)))
    scale = data.draw(st.sampled_from([1e-30, 1e-6, 0.02, 1.0, 3e4, 1e20]))
    offset = data.draw(st.integers(0, 3))  # unaligned starts
    x = planted(dtype, n, offset, scale, positions, values, seed=n + offset)
    sat = data.draw(st.sampled_from([None, 1.0, 3e4]))
    hist = data.draw(st.booleans())
    assert_matches_reference([x], saturation=sat, histogram=hist)


@kernel_param
def test_sums_are_deterministic_and_close_to_float64(kernel):
    with use_kernel(kernel):
        x = torch.randn(3 * CHUNK + 5, generator=torch.Generator().manual_seed(15)) * 1e3
        a = torchhealth.tensor_stats([x]).data
        assert torch.equal(torchhealth.tensor_stats([x]).data, a)
        exact = math.fsum(x.double().tolist())
        assert abs(torchhealth.tensor_stats([x]).sum.item() - exact) <= S.SUM_RTOL * x.double().abs().sum().item()


# --- build hygiene --------------------------------------------------------------------

def test_only_the_per_isa_kernels_contain_vector_extension_code():
    """kernel_avx2.cpp and kernel_avx512.cpp compile under #pragma GCC target;
    if an inline function of ATen, c10 or stats.h were emitted there, the
    linker could keep that AVX copy for every caller (one-definition rule) and
    the library would crash on older CPUs. The build uses no -march, so any
    VEX/EVEX instruction outside the avx2/avx512 namespaces is such a leak."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    from torchhealth import _C

    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils)")
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(Path(_C.__file__))],
                         capture_output=True, text=True, check=True).stdout
    leaks, fn = set(), None
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
        elif re.match(r"^\s+[0-9a-f]+:\s+v[a-z]", line) and fn is not None and not re.search(
                r"torchhealth::cpu::avx(2|512)::", fn):
            leaks.add(fn)
    assert not leaks, sorted(leaks)[:10]


# --- flush-to-zero ---------------------------------------------------------------------

@contextlib.contextmanager
def flush_denormal():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _subnormal_heavy(dtype):
    """Subnormals alone (min, max and sum are then subnormal arithmetic), next to
    normals, at chunk edges, and over several chunks (worker threads)."""
    fi = torch.finfo(dtype)
    tiny = fi.smallest_normal * fi.eps
    g = torch.Generator().manual_seed(16)
    mixed = torch.randn(2 * CHUNK + 37, generator=g, dtype=torch.float64) * fi.smallest_normal
    mixed[::5] = torch.randn(mixed[::5].shape, generator=g, dtype=torch.float64)
    vals = make(edge_values(dtype), torch.float64)
    for i, pos in enumerate(EDGES):
        mixed[pos] = vals[i % vals.numel()]
    return [make([fi.smallest_normal / 4] * 10, dtype),  # the ten float32 subnormals
            make([tiny, 3 * tiny, -5 * tiny, -0.0, tiny * 7], dtype),
            make([-tiny] * 3000, dtype), mixed.to(dtype)]


@kernel_param
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_flush_to_zero_mode_changes_nothing(kernel, dtype):
    with use_kernel(kernel):
        ts = _subnormal_heavy(dtype)
        want = torchhealth.tensor_stats(ts).data
        want_ref = reference.tensor_stats(ts)
        assert want[:, S.SUBNORMAL].tolist()[:3] == [10, 4, 3000]
        with flush_denormal():
            got = torchhealth.tensor_stats(ts).data
            got_ref = reference.tensor_stats(ts)
            assert_matches_reference(ts)
        assert torch.equal(got, want)  # bit for bit, sums included
        # The reference's sums of float64 subnormals are torch arithmetic, which
        # flush-to-zero changes (by < 2^-1022 a value, within the tests' slack).
        exact = [c for c in range(want_ref.shape[1]) if dtype != torch.float64 or
                 c not in (S.SUM, S.SUMSQ)]
        assert torch.equal(got_ref[:, exact], want_ref[:, exact])


# --- float8 --------------------------------------------------------------------------

F8 = [torch.float8_e4m3fn, torch.float8_e5m2]
f8_param = pytest.mark.parametrize("f8", F8, ids=["e4m3fn", "e5m2"])


def _all_f8(f8):
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(f8)


@kernel_param
@f8_param
def test_float8_every_bit_pattern(kernel, f8):
    """All 256 values, alone, shuffled and repeated over block and chunk edges,
    each kernel bit for bit against the reference."""
    with use_kernel(kernel):
        x = _all_f8(f8)
        perm = torch.randperm(256, generator=torch.Generator().manual_seed(17))
        big = x.repeat(2 * CHUNK // 256 + 3)[5:]  # unaligned start, several chunks
        ts = [x, x[perm], big, x[:7], x[perm][:129]]
        for histogram in (True, False):
            assert_matches_reference(ts, histogram=histogram)
        assert_matches_reference(ts, saturation=1.0)
        assert_matches_reference(ts, saturation=1e6)


@kernel_param
@f8_param
def test_float8_flush_to_zero_mode_changes_nothing(kernel, f8):
    """The vector kernels decode float8 through float16 arithmetic (an e4m3fn
    value is scaled by 2^8): every bit pattern gives the same row, sums
    included, with flush-to-zero on."""
    with use_kernel(kernel):
        x = _all_f8(f8)
        ts = [x, x.repeat(2 * CHUNK // 256 + 3)[3:]]
        want = torchhealth.tensor_stats(ts).data
        with flush_denormal():
            got = torchhealth.tensor_stats(ts).data
        assert torch.equal(got, want)


@kernel_param
@f8_param
def test_float8_specials_in_normal_data(kernel, f8):
    """Random data in the format's range (the fast vector path) with specials
    planted at lane, block and chunk edges."""
    with use_kernel(kernel):
        g = torch.Generator().manual_seed(18)
        fi = torch.finfo(f8)
        n = 2 * CHUNK + 37
        base = torch.randn(n, generator=g, dtype=torch.float64) * 2.0
        vals = [math.nan, 0.0, -0.0, fi.max, -fi.max, fi.max / 2, fi.smallest_normal,
                -fi.smallest_normal, fi.smallest_normal / 2, fi.smallest_normal * fi.eps, 1.0]
        if f8 == torch.float8_e5m2:
            vals += [math.inf, -math.inf]
        dense = base.clone()
        for i, pos in enumerate(EDGES):
            dense[pos] = vals[i % len(vals)]
        ts = [dense.to(f8), base.to(f8), (base * 1e-3).to(f8)]
        assert_matches_reference(ts)
        assert_matches_reference(ts, histogram=False)


@f8_param
def test_float8_semantics(f8):
    """Values that name the format's own limits: saturation at half its max,
    subnormals below its own smallest normal, e4m3fn's NaN and e5m2's Inf."""
    fi = torch.finfo(f8)
    x = _all_f8(f8)
    s = torchhealth.tensor_stats([x])
    if f8 == torch.float8_e4m3fn:
        assert (fi.max, fi.smallest_normal) == (448.0, 2.0**-6)
        assert (s.nan.item(), s.posinf.item(), s.neginf.item()) == (2, 0, 0)  # 0x7f, 0xff
        assert s.saturated.item() == 2 * 9  # 224, 240, 256, 288, ..., 448 and negatives
    else:
        assert (fi.max, fi.smallest_normal) == (57344.0, 2.0**-14)
        assert (s.nan.item(), s.posinf.item(), s.neginf.item()) == (6, 1, 1)
        assert s.saturated.item() == 2 * 5  # 28672, 32768, ..., 57344 and negatives
    assert s.zero.item() == 2 and s.subnormal.item() == 2 * (7 if f8 == torch.float8_e4m3fn else 3)
    assert s.max.item() == fi.max and s.min.item() == -fi.max
    assert s.hist.sum().item() == 256 - 2 - s.nan.item() - s.posinf.item() - s.neginf.item()
    # The histogram is on the common grid: 1.0 lands where it does for float32.
    one = torchhealth.tensor_stats([torch.ones(3, dtype=f8)]).hist
    assert torch.equal(one, torchhealth.tensor_stats([torch.ones(3)]).hist)


# --- a concurrent writer -----------------------------------------------------------------

@kernel_param
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_rows_stay_self_consistent_under_a_concurrent_writer(kernel, dtype):
    """Statistics of a tensor another thread is writing are undefined, but every
    element is classified once: non-finite + zero + binned values == numel."""
    import threading

    with use_kernel(kernel):
        n = 2 * CHUNK + 1000
        x = torch.randn(n, generator=torch.Generator().manual_seed(19), dtype=torch.float64).to(dtype)
        fills = [math.nan, 0.0, 1.0, math.inf, 1e-40, -3.0, 2.0**100, -0.0]
        stop = threading.Event()

        def writer():
            i = 0
            while not stop.is_set():  # torch ops release the GIL while they write
                x[(i * 997) % 64::64].fill_(fills[i % len(fills)])
                i += 1

        w = threading.Thread(target=writer)
        w.start()
        try:
            rows = [torchhealth.tensor_stats([x, x[1:]]) for _ in range(30)]
        finally:
            stop.set()
            w.join()
        for s in rows:
            classified = s.nan + s.posinf + s.neginf + s.zero + s.hist.sum(dim=1)
            assert classified.tolist() == [n, n - 1]
            assert (s.subnormal <= s.hist.sum(dim=1)).all()
