"""GPU tests of the CUDA kernel (csrc/cuda/).

Every test here is marked `cuda` and skipped without a GPU. The CUDA kernel was
compiled and linked on the development machine (scripts/check_cuda_build.sh)
but NEVER run there: no GPU was available, so none of these tests has run yet.

The CPU suite (test_stats.py) also runs its `device`-parametrised tests on CUDA
when a GPU is present; this file adds what is specific to the GPU path: the
CUDA kernel against the reference and the CPU kernel on property-style inputs
that straddle its 16-byte units and blocks, many tensors in one call, a launch
count independent of the number of tensors, no host synchronisation, CUDA-graph
capture and replay (a first-ever call inside a capture too), determinism,
every column the same bits with and without the histogram, torch.compile, and
>2^31 elements, aligned and not.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchhealth
from torchhealth import reference
from torchhealth import stats as S

from helpers import EXACT, specials

pytestmark = pytest.mark.cuda

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT_BYTES = 16  # csrc/plan.h kUnitBytes
THREADS = 256  # csrc/cuda/launch.h kThreads


def randn(n, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)


def with_specials(x: torch.Tensor, positions, seed=0) -> torch.Tensor:
    """x (CPU) with the dtype's special values written at the given positions."""
    sp = torch.tensor(specials(x.dtype), dtype=torch.float64).to(x.dtype)
    flat = x.view(-1)
    for k, p in enumerate(positions):
        if 0 <= p < flat.numel():
            flat[p] = sp[(k + seed) % sp.numel()]
    return x


def compare(got: torch.Tensor, tensors_cpu, **kwargs):
    """`got` (a tensor_stats result) equals the reference bit for bit on every
    exact column and the histogram, and is within the documented bound on sum
    and sumsq."""
    got = got.cpu()
    want = reference.tensor_stats(tensors_cpu, **kwargs)
    assert got.shape == want.shape
    exact = EXACT + list(range(S.COLS, got.shape[1]))
    bad = (got[:, exact] != want[:, exact]).nonzero()
    assert bad.numel() == 0, f"first mismatches (row, exact column): {bad[:5].tolist()}"
    for col, power in ((S.SUM, 1), (S.SUMSQ, 2)):
        g = got[:, col].view(torch.float64)
        w = want[:, col].view(torch.float64)
        for i, t in enumerate(tensors_cpu):
            xd = t.double()
            scale = torch.where(torch.isfinite(xd), xd, 0.0).abs().pow(power).sum().item()
            if math.isfinite(scale):
                assert abs(g[i].item() - w[i].item()) <= S.SUM_RTOL * scale + 1e-300, (i, col)
    return got


def check(tensors_cuda, **kwargs):
    """The CUDA kernel against the reference, and against the CPU kernel on the
    same tensors (bit-identical counts, extremes and histogram)."""
    got = torchhealth.tensor_stats(tensors_cuda, **kwargs).data
    assert got.device.type == "cuda"
    cpu_tensors = [t.detach().cpu() for t in tensors_cuda]
    got = compare(got, cpu_tensors, **kwargs)
    cpu = torchhealth.tensor_stats(cpu_tensors, **kwargs).data
    exact = EXACT + list(range(S.COLS, got.shape[1]))
    assert torch.equal(got[:, exact], cpu[:, exact]), "CUDA and CPU kernels disagree"
    return got


def test_extension_has_a_cuda_kernel():
    assert torchhealth.backend().cuda, (
        "torchhealth._C has no CUDA kernel: rebuild with TORCHHEALTH_CUDA=1 "
        "(CUDA_HOME pointing at the toolkit) to run the GPU tests")


# --- against the reference and the CPU kernel ------------------------------------------

SIZES = [1, 2, 7, 8, 9, 15, 16, 17, THREADS - 1, THREADS, THREADS + 1, 4095, 4096, 4097,
         (1 << 16) + 1, (1 << 20) + 3]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_specials_anywhere(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    n = data.draw(st.sampled_from(SIZES))
    per_unit = UNIT_BYTES // torch.empty((), dtype=dtype).element_size()
    edges = [0, n - 1, per_unit - 1, per_unit, THREADS * per_unit - 1, THREADS * per_unit,
             n // 2, n - per_unit]
    positions = data.draw(st.lists(st.one_of(st.sampled_from(edges), st.integers(0, n - 1)),
                                   max_size=16))
    scale = data.draw(st.sampled_from([1e-6, 0.02, 1.0, 1e3]))
    offset = data.draw(st.integers(0, 7))  # offsets that break 16-byte alignment
    sat = data.draw(st.sampled_from([None, 1.0, 3e4]))
    histogram = data.draw(st.booleans())
    base = with_specials(randn(n + offset, dtype, n, scale)[offset:].clone(), positions)
    buf = torch.empty(n + offset, dtype=dtype, device="cuda")
    x = buf[offset:]
    x.copy_(base)
    check([x, x[: n // 3]], saturation=sat, histogram=histogram)


CHUNK = 1 << 16  # csrc/checks.h kChunk: where the CPU kernel's partial results meet


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_sizes_at_chunk_boundaries(dtype, n):
    positions = {0, n - 1, min(n - 1, CHUNK - 1), min(n - 1, CHUNK), n // 2}
    x = with_specials(randn(n, dtype, n, 3.0), sorted(positions))
    check([x.cuda()])
    check([x.cuda()], histogram=False)


@pytest.mark.parametrize("histogram", [True, False])
def test_mixed_dtypes_and_layouts_in_one_call(histogram):
    ts = []
    for i, dt in enumerate(DTYPES):
        big = with_specials(randn(300_001 + i, dt, i, 10.0), [0, 1, 4095, 4096, 65535, 300_000])
        ts += [big.cuda(), torch.tensor(1.5, dtype=dt).cuda(), torch.empty(0, dtype=dt).cuda(),
               big[3:1000].cuda()]
        m = randn(64 * 48, dt, 10 + i).view(64, 48).cuda()
        ts += [m.t(), m[1:, 3:], m.view(-1)[5:], m[::2, ::3], m[:, 5]]
        img = randn(2 * 3 * 5 * 7, dt, 20 + i).view(2, 3, 5, 7).cuda()
        ts.append(img.to(memory_format=torch.channels_last))
    got = check(ts, histogram=histogram)
    assert got[:, S.NUMEL].tolist() == [t.numel() for t in ts]


def test_every_16_bit_pattern_and_random_32_64_bit_patterns():
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    g = torch.Generator().manual_seed(1)
    f32 = torch.randint(-(1 << 31), 1 << 31, (300_000,), generator=g, dtype=torch.int64)
    f64 = torch.randint(-(1 << 62), 1 << 62, (300_000,), generator=g, dtype=torch.int64) * 2
    sub = torch.randint(1, 1 << 23, (100_000,), generator=g, dtype=torch.int32)
    ts = [x.view(torch.float16), x.view(torch.bfloat16), f32.to(torch.int32).view(torch.float32),
          f64.view(torch.float64), sub.view(torch.float32), -sub.view(torch.float32)]
    check([t.cuda() for t in ts])


def test_10000_tiny_tensors_and_one_huge():
    g = torch.Generator().manual_seed(2)
    ts = []
    for i in range(10_000):
        n = int(torch.randint(0, 40, (1,), generator=g))
        t = randn(n, DTYPES[i % 4], i)
        if n and i % 7 == 0:
            t[0] = [math.nan, math.inf, -0.0, 1e-40][i % 4]
        ts.append(t)
    huge = with_specials(randn(3_000_017, torch.float32, 99), [0, 1_000_000, 3_000_016])
    ts.insert(5000, huge)
    got = check([t.cuda() for t in ts])
    assert got[:, S.NUMEL].tolist() == [t.numel() for t in ts]


def test_one_tensor_across_every_block_with_specials_everywhere():
    # Enough bytes that every block of the grid reads part of it: specials at
    # many places land at or near block boundaries whatever the grid size.
    for dt in DTYPES:
        n = (40 << 20) // torch.empty((), dtype=dt).element_size() + 3
        x = randn(n, dt, 5, 3.0)
        x = with_specials(x, list(range(0, n, 4093)) + [n - 1])
        check([torch.ones(5, dtype=dt).cuda(), x.cuda(), torch.ones(3, dtype=dt).cuda()])


def test_saturation_and_no_finite_values():
    for dt in DTYPES:
        fi = torch.finfo(dt)
        x = torch.tensor([fi.max / 2, -fi.max / 2, fi.max / 4, 100.0, -100.0, 99.0, math.inf],
                         dtype=torch.float64).to(dt)
        check([x.cuda()], saturation=99.5)
        check([x.cuda()])
        none = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64).to(dt).cuda()
        s = torchhealth.tensor_stats([none, none[:0]])
        assert s.min.tolist() == [math.inf] * 2 and s.max.tolist() == [-math.inf] * 2
        assert s.absmax.tolist() == [0.0, 0.0] and s.sum.tolist() == [0.0, 0.0]


# --- launches, streams, synchronisation -------------------------------------------------

def _device_events(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()  # warm up: caches, lazy module loading
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("histogram", [True, False])
def test_launch_count_does_not_grow_with_the_number_of_tensors(histogram):
    counts = {}
    for num in (10, 1000, 10_000):
        ts = [torch.randn(17 + i % 100, device="cuda").to(DTYPES[i % 4]) for i in range(num)]
        ts.append(torch.randn(1 << 20, device="cuda"))
        events = _device_events(lambda: torchhealth.tensor_stats(ts, histogram=histogram))
        kernels = [e for e in events if not e.startswith(("Memcpy", "Memset"))]
        assert all("stats_" in k for k in kernels), kernels
        assert 1 <= len(kernels) <= 3, events
        counts[num] = (len(kernels), len(events))
    assert len(set(counts.values())) == 1, counts


def test_no_host_synchronisation():
    ts = [torch.randn(1000, device="cuda").to(dt) for dt in DTYPES]
    ts += [torch.randn(64, 48, device="cuda")[::2, ::3], torch.randn(1 << 20, device="cuda")]
    torchhealth.tensor_stats(ts)  # warm up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = torchhealth.tensor_stats(ts)
        b = torchhealth.tensor_stats(ts, histogram=False, saturation=2.0)
        total = a.total()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    compare(a.data, [t.cpu() for t in ts])
    compare(b.data, [t.cpu() for t in ts], histogram=False, saturation=2.0)
    assert total.numel.item() == sum(t.numel() for t in ts)


def test_runs_on_the_current_stream():
    x = torch.zeros(1 << 22, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the fill below lands late unless the op waits in order
        x.fill_(2.0)
        x[7] = math.nan
        s = torchhealth.tensor_stats([x])
    side.synchronize()
    assert s.nan.item() == 1 and s.max.item() == 2.0 and s.zero.item() == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_non_current_device():
    x = with_specials(randn(100_000, torch.float32, 3), [0, 99_999]).to("cuda:1")
    with torch.cuda.device(0):
        got = torchhealth.tensor_stats([x]).data
    assert got.device == x.device
    compare(got, [x.cpu()])


def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="once per device"):
        torchhealth.tensor_stats([torch.ones(2, device="cuda"), torch.ones(2)])
    with pytest.raises(RuntimeError, match="once per device"):
        torch.ops.torchhealth.tensor_stats([torch.ones(2, device="cuda"), torch.ones(2)])


# --- CUDA graphs ------------------------------------------------------------------------

def _graph_inputs():
    shapes = [(1000, torch.float16), (70_001, torch.float32), (3, torch.bfloat16),
              (0, torch.float64), ((1 << 20) + 1, torch.float64), (257, torch.float32)]
    return [torch.zeros(n, dtype=dt, device="cuda") for n, dt in shapes]


def _capture(xs, **kwargs):
    side = torch.cuda.Stream()  # warm up on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torchhealth.tensor_stats(xs, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torchhealth.tensor_stats(xs, **kwargs).data
    return graph, out


@pytest.mark.parametrize("histogram", [True, False])
def test_cuda_graph_replay_sees_new_data(histogram):
    xs = _graph_inputs()
    graph, out = _capture(xs, histogram=histogram)
    for step in range(3):
        new = [with_specials(randn(x.numel(), x.dtype, 100 * step + i, 10.0 ** step),
                             [0, x.numel() - 1, x.numel() // 2], seed=step)
               for i, x in enumerate(xs)]
        for x, v in zip(xs, new):
            x.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        compare(out, new, histogram=histogram)


def test_cuda_graph_replay_after_other_eager_calls():
    # Eager calls made after the capture reuse the pinned-memory and device
    # allocators' blocks; the captured table must not be among them.
    xs = _graph_inputs()
    graph, out = _capture(xs)
    for i in range(20):
        others = [torch.randn(10 + i, device="cuda") for _ in range(50 + i)]
        torchhealth.tensor_stats(others)
    new = [with_specials(randn(x.numel(), x.dtype, 7 + i), [0, x.numel() - 1])
           for i, x in enumerate(xs)]
    for x, v in zip(xs, new):
        x.copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    compare(out, new)


def test_eager_call_after_tensors_are_replaced_reads_the_new_ones():
    # The table is rebuilt from the tensors on every call: nothing is cached
    # that a new set of pointers could make stale.
    a = [torch.full((1000,), 1.0, device="cuda")]
    first = torchhealth.tensor_stats(a).data.clone()
    del a
    b = [torch.full((1000,), 3.0, device="cuda"), torch.full((5,), -2.0, device="cuda")]
    second = torchhealth.tensor_stats(b)
    assert second.max.tolist() == [3.0, -2.0]
    assert first[0, S.NUMEL].item() == 1000


# --- determinism, size, compile ------------------------------------------------------------

def test_deterministic_over_repeated_runs():
    ts = [randn(9_000_011, torch.float32, 1, 1e3).cuda(), randn(5_000_001, torch.float16, 2).cuda(),
          randn(3_000_003, torch.bfloat16, 3).cuda(), randn(2_000_000, torch.float64, 4, 1e-3).cuda()]
    ts += [randn(i, DTYPES[i % 4], i).cuda() for i in range(1, 2000)]
    first = torchhealth.tensor_stats(ts).data
    for _ in range(5):
        assert torch.equal(torchhealth.tensor_stats(ts).data, first)
    no_hist = torchhealth.tensor_stats(ts, histogram=False).data
    for _ in range(3):
        assert torch.equal(torchhealth.tensor_stats(ts, histogram=False).data, no_hist)
    assert torch.equal(no_hist[:, EXACT], first[:, EXACT])


def test_every_column_is_the_same_bits_with_and_without_the_histogram():
    # The grid and each thread's order of accumulation (and so the float
    # partial sums, csrc/cuda/thread_acc.h) do not depend on the histogram:
    # sum and sumsq too are the same bits, not just within the bound.
    ts = []
    for i, dt in enumerate(DTYPES + FLOAT8):
        for n, offset in ((1, 0), (37, 1), (THREADS * 16 + 5, 0), (300_001, 3), (5_000_017, 0)):
            x = with_specials(randn(n + offset, dt, 10 * i + n, 10.0)[offset:].clone(),
                              [0, n // 2, n - 1], seed=i)
            buf = torch.empty(n + offset, dtype=dt, device="cuda")
            buf[offset:].copy_(x)
            ts.append(buf[offset:])
    ts.append(randn(64 * 48, torch.float32, 3).view(64, 48).cuda().t())
    for sat in (None, 2.0):
        on = torchhealth.tensor_stats(ts, saturation=sat).data
        off = torchhealth.tensor_stats(ts, histogram=False, saturation=sat).data
        assert off.shape == (len(ts), S.COLS)
        bad = (on[:, :S.COLS] != off).nonzero()
        assert bad.numel() == 0, f"first mismatches (row, column): {bad[:5].tolist()}"
        compare(on, [t.cpu() for t in ts], saturation=sat)


def test_more_than_2_31_elements():
    n = (1 << 31) + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * n + (1 << 30):
        pytest.skip(f"needs {2 * n / 2**30 + 1:.1f} GiB of free device memory, has {free / 2**30:.1f}")
    x = torch.zeros(n, dtype=torch.float16, device="cuda")
    x[-1] = math.nan
    x[(1 << 31) - 1] = -math.inf
    x[1 << 31] = 3.0
    x[5] = -2.0
    s = torchhealth.tensor_stats([torch.ones(3, device="cuda"), x])
    assert s.numel.tolist() == [3, n]
    assert (s.nan[1].item(), s.neginf[1].item(), s.zero[1].item()) == (1, 1, n - 4)
    assert (s.min[1].item(), s.max[1].item(), s.sum[1].item()) == (-2.0, 3.0, 1.0)
    assert s.hist[1].sum().item() == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e5m2],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_unaligned_tensor_above_2_31_elements(dtype):
    # Not 16-byte aligned, so every element goes through the scalar loop, whose
    # indices must not wrap at 2^31; and with float8, blocks of up to 2^31
    # elements whose shared histogram counters must not overflow.
    n = (1 << 31) + 5
    itemsize = torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info()
    if free < (n + 1) * itemsize + (1 << 30):
        pytest.skip(f"needs {(n + 1) * itemsize / 2**30 + 1:.1f} GiB of free device memory, "
                    f"has {free / 2**30:.1f}")
    buf = torch.zeros(n + 1, dtype=dtype, device="cuda")
    x = buf[1:]
    assert x.data_ptr() % UNIT_BYTES != 0
    planted = {5: -2.0, n // 2: 0.5, (1 << 31) - 1: -math.inf, 1 << 31: 3.0, n - 1: math.nan}
    for i, v in planted.items():
        x[i] = v
    s = torchhealth.tensor_stats([torch.ones(3, device="cuda"), x])
    assert s.numel.tolist() == [3, n]
    assert (s.nan[1].item(), s.neginf[1].item(), s.zero[1].item()) == (1, 1, n - len(planted))
    assert (s.min[1].item(), s.max[1].item(), s.absmax[1].item()) == (-2.0, 3.0, 3.0)
    assert s.sum[1].item() == 1.5 and s.sumsq[1].item() == 13.25
    finite = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64).to(dtype)
    want = reference.tensor_stats([finite])[0, S.COLS:]
    assert torch.equal(s.hist[1].cpu(), want)


# Run in a process of its own, so that the op has never been called there: its
# grid-size query and the kernels' loading happen inside the capture.
FIRST_CALL_IN_CAPTURE = """
import math, torch, torchhealth
from test_cuda import compare, randn
xs = [torch.zeros(n, dtype=dt, device="cuda") for n, dt in
      ((1000, torch.float16), (70_001, torch.float32), ((1 << 20) + 1, torch.bfloat16),
       (3, torch.float64), (4097, torch.float8_e4m3fn))]
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # the default, strictest capture error mode
    out = torchhealth.tensor_stats(xs).data
for step in range(2):
    new = [randn(x.numel(), x.dtype, 10 * step + i, 3.0) for i, x in enumerate(xs)]
    new[1][7] = math.nan
    for x, v in zip(xs, new):
        x.copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    compare(out, new)
print("replayed")
"""


def test_first_ever_call_inside_a_cuda_graph_capture():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", FIRST_CALL_IN_CAPTURE], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "replayed" in r.stdout, r.stderr[-4000:]


def test_torch_compile_fullgraph():
    def f(a, b):
        s = torchhealth.tensor_stats([a, b])
        return s.nonfinite.sum(), s.l2norm, s.hist.sum(0), s.max

    a = torch.randn(1000, device="cuda")
    b = torch.randn(10, 10, device="cuda").half()
    a[3] = math.nan
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(a, b), f(a, b)):
        assert torch.equal(got, want)
    b[0, 0] = math.inf  # new data, same graph
    assert compiled(a, b)[0].item() == 2


@pytest.mark.parametrize("histogram", [True, False])
def test_opcheck(histogram):
    args = ([torch.randn(5, 3, device="cuda"), torch.randn(7, device="cuda").half(),
             torch.randn(0, device="cuda").double(), torch.randn(4, 4, device="cuda").t()],
            histogram, None)
    torch.library.opcheck(torch.ops.torchhealth.tensor_stats.default, args)
