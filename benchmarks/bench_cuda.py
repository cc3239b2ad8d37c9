"""GPU half of the benchmark: torchhealth.tensor_stats on CUDA against a plain
read of the same bytes, the pure-Python checks people write today and the
foreach ops PyTorch offers.

    python benchmarks/bench_cuda.py [--quick] [--min-run-time SECONDS]

The CUDA kernel was compiled and linked on the development machine but NEVER
run there (no GPU): this script has not produced a number yet, and its GPU
code paths (everything past the "no CUDA device" check) have never run. Without a CUDA
device, or with an extension built without CUDA, it says so and exits.

Goal: the fused op reads every byte once, so it should reach at least 90% of the
bandwidth a plain read achieves (torch.sum over one buffer of the same size)
for models of 100M parameters and more. Floor: bytes read / bandwidth, e.g.
GPT-2 small's float32 parameters and gradients (0.99 GB) in about 0.3 ms on an
H100 (HBM3, ~3.35 TB/s).

Bandwidths are bytes read per second (GB = 1e9 bytes); the device-to-device copy
counts its read and its write. "of read" is the fraction of the plain read's
bandwidth.

First, one table per dtype (float32, bfloat16, float16, float8_e4m3fn: GPT-2
small's parameters and gradients in that dtype): the op's achieved bandwidth
against the device's peak, computed from `torch.cuda.get_device_properties`
(2 transfers per memory clock x bus width; HBM and GDDR report their effective
clock so), and against the measured roofline (the faster of a plain read and a
device-to-device copy of the same bytes).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
from torch.utils import benchmark

from torchhealth.bench import gpt2_shapes

GOAL = 0.90


def make_case(shapes, param_dtype, grad_dtype):
    """Parameters and gradients as one list, like a health check reads them."""
    params = [torch.randn(s, device="cuda", dtype=param_dtype) * 0.02 for s in shapes]
    grads = [torch.randn(s, device="cuda", dtype=grad_dtype) * 1e-3 for s in shapes]
    return params + grads


def nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def python_checks(ts):
    """What a training loop typically does today: several ops per tensor."""
    rows = [torch.stack([t.isnan().sum().double(), t.isinf().sum().double(),
                         t.abs().amax().double(), t.double().norm()]) for t in ts]
    return torch.stack(rows)


def timed(stmt, ts, min_run_time, **globs):
    timer = benchmark.Timer(stmt=stmt, globals={"ts": ts, "torch": torch, **globs})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def run_case(name, ts, min_run_time, with_python=True):
    import torchhealth

    size = nbytes(ts)
    flat = torch.empty(size // 4, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(flat)
    found_inf = torch.zeros((), device="cuda")
    one = torch.ones((), device="cuda")
    g = {"flat": flat, "dst": dst, "th": torchhealth, "found_inf": found_inf, "one": one,
         "python_checks": python_checks}
    rows = []
    read = timed("flat.sum()", ts, min_run_time, **g)
    rows.append(("plain read: torch.sum of one buffer", read, size))
    rows.append(("device-to-device copy (read + write)",
                 timed("dst.copy_(flat)", ts, min_run_time, **g), 2 * size))
    rows.append(("torchhealth.tensor_stats",
                 timed("th.tensor_stats(ts)", ts, min_run_time, **g), size))
    rows.append(("torchhealth.tensor_stats(histogram=False)",
                 timed("th.tensor_stats(ts, histogram=False)", ts, min_run_time, **g), size))
    if all(t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for t in ts):
        rows.append(("torch._foreach_norm (L2 only)",
                     timed("torch._foreach_norm(ts)", ts, min_run_time, **g), size))
        rows.append(("torch._foreach_norm(inf) (absmax only)",
                     timed("torch._foreach_norm(ts, math.inf)", ts, min_run_time, math=math, **g),
                     size))
    if len({t.dtype for t in ts}) == 1 and ts[0].dtype != torch.float64:
        # Reads and writes every tensor (unscale by 1.0): the AMP inf/NaN check.
        rows.append(("torch._amp_foreach_non_finite_check_and_unscale_ (read + write)",
                     timed("torch._amp_foreach_non_finite_check_and_unscale_(ts, found_inf, one)",
                           ts, min_run_time, **g), 2 * size))
    if with_python:
        rows.append(("pure Python: isnan/isinf/abs-max/norm per tensor",
                     timed("python_checks(ts)", ts, min_run_time, **g), size))

    read_bw = size / read
    print(f"\n{name}: {len(ts)} tensors, {size / 1e9:.3f} GB read; "
          f"floor at the measured read bandwidth: {read * 1e3:.3f} ms")
    print(f"  {'what':<66} {'ms':>9} {'GB/s':>8} {'of read':>8}")
    for what, sec, moved in rows:
        bw = moved / sec
        print(f"  {what:<66} {sec * 1e3:9.3f} {bw / 1e9:8.1f} {bw / read_bw:8.1%}")
    fused = size / rows[2][1]
    verdict = "meets" if fused >= GOAL * read_bw else "MISSES"
    print(f"  goal (>= {GOAL:.0%} of a plain read for models >= 100M parameters): "
          f"{fused / read_bw:.1%}, {verdict} it")


PER_DTYPE = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def peak_bandwidth(props) -> float | None:
    """Bytes per second the device's memory can move, from its properties: two
    transfers per memory clock over the bus. None when torch does not report
    them (memory_clock_rate is in kHz, memory_bus_width in bits)."""
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz <= 0 or bus_bits <= 0:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def per_dtype_table(shapes, min_run_time, peak) -> None:
    """The op's bandwidth per dtype, against the device's peak and the measured
    roofline of the same bytes."""
    import torchhealth

    print("\nGPT-2 small (124M) params + grads, one dtype at a time: bandwidth of tensor_stats")
    print(f"  {'dtype':<15} {'GB':>6} {'roofline GB/s':>13} {'hist GB/s':>10} {'of peak':>8} "
          f"{'of roof':>8} {'no-hist GB/s':>13} {'of peak':>8} {'of roof':>8}")
    for dt in PER_DTYPE:
        ts = [(torch.randn(s, device="cuda") * scale).to(dt)
              for scale in (0.02, 1e-3) for s in shapes]
        size = nbytes(ts)
        flat = torch.empty(size // 4, device="cuda", dtype=torch.float32).normal_()
        dst = torch.empty_like(flat)
        g = {"flat": flat, "dst": dst, "th": torchhealth}
        read = size / timed("flat.sum()", ts, min_run_time, **g)
        copy = 2 * size / timed("dst.copy_(flat)", ts, min_run_time, **g)
        roof = max(read, copy)
        hist = size / timed("th.tensor_stats(ts)", ts, min_run_time, **g)
        plain = size / timed("th.tensor_stats(ts, histogram=False)", ts, min_run_time, **g)

        def of_peak(bw):
            return f"{bw / peak:8.1%}" if peak else f"{'n/a':>8}"

        name = str(dt).replace("torch.", "")
        print(f"  {name:<15} {size / 1e9:6.3f} {roof / 1e9:13.1f} {hist / 1e9:10.1f} {of_peak(hist)} "
              f"{hist / roof:8.1%} {plain / 1e9:13.1f} {of_peak(plain)} {plain / roof:8.1%}")
        del ts, flat, dst
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="GPT-2 small and the tiny tensors only")
    p.add_argument("--min-run-time", type=float, default=1.0)
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device visible; the GPU benchmark needs one (skipped). "
              "The CUDA kernel has been compiled and linked but never run on this machine.")
        return 0
    import torchhealth

    if not torchhealth.backend().cuda:
        print(f"bench_cuda: torchhealth has no CUDA kernel ({torchhealth.backend()}); "
              "rebuild with TORCHHEALTH_CUDA=1", file=sys.stderr)
        return 1
    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth(props)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}; {torchhealth.backend()}")
    print("peak memory bandwidth from the device's properties: "
          + (f"{peak / 1e9:.0f} GB/s" if peak else "not reported by this torch"))
    per_dtype_table(gpt2_shapes(n_layer=12, d=768), args.min_run_time, peak)

    cases = [
        ("GPT-2 small (124M) float32 params + grads", gpt2_shapes(n_layer=12, d=768),
         torch.float32, torch.float32),
        ("10,000 tiny float32 tensors (1,024 elements each)", [(1024,)] * 5000,
         torch.float32, torch.float32),
    ]
    if not args.quick:
        cases += [
            ("GPT-2 medium (355M) bfloat16 params + grads", gpt2_shapes(n_layer=24, d=1024),
             torch.bfloat16, torch.bfloat16),
            ("GPT-2 medium (355M) float32 master params + bfloat16 grads",
             gpt2_shapes(n_layer=24, d=1024), torch.float32, torch.bfloat16),
            ("GPT-2 XL (1.5B) bfloat16 params + grads", gpt2_shapes(n_layer=48, d=1600),
             torch.bfloat16, torch.bfloat16),
        ]
    for name, shapes, pdt, gdt in cases:
        need = sum(math.prod(s) for s in shapes) * (torch.finfo(pdt).bits + torch.finfo(gdt).bits) // 8
        free, _ = torch.cuda.mem_get_info()
        if 3.3 * need > free:  # the tensors, the read buffer and the copy's destination
            print(f"\n{name}: skipped, needs about {3.3 * need / 2**30:.1f} GiB free, "
                  f"{free / 2**30:.1f} GiB available")
            continue
        ts = make_case(shapes, pdt, gdt)
        run_case(name, ts, args.min_run_time, with_python=True)
        del ts
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
