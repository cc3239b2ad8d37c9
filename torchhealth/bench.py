"""CPU benchmark of `tensor_stats` against the memory floor and the checks people write.

One table, every row measured in the same run and interleaved (each round runs
every method once; a row's time is its minimum over the rounds), so that rows
are compared under the same machine state:

- floor: ``torch.sum`` of one flat buffer holding the same bytes (the tensors of
  a model are views into it), i.e. one read of the data (float8: its bytes as int64);
- torchhealth with and without the histogram, for each CPU kernel this CPU runs;
- the pure-Python checks (per tensor: isnan().sum(), isinf().sum(), min, max,
  abs().max(), sum, (x*x).sum(), (x==0).sum(), histc, each read with .item();
  float8 tensors, which torch's reductions refuse, copied to float32 first);
- ``torch.isfinite(g).all()`` per tensor, read with ``bool()``;
- ``torch._foreach_norm`` + ``torch._amp_foreach_non_finite_check_and_unscale_``.

Models: GPT-2 small's 148 parameter tensors and as many gradients (float32,
~1 GB; and bfloat16; ``--dtypes`` also takes float16 and the float8 formats,
drawn scaled into their range), and 10,000 tensors of 1-4k elements.

    python -m torchhealth.bench [--quick] [--repeat N] [--progress]

It lives in the package, not only under benchmarks/, because it is the
`torchhealth bench` command: users measure on their own machine what the
README claims. benchmarks/bench_stats.py runs the same from a checkout.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Progress = Callable[[int, int, str], None]  # (done, total, what)


# --- models --------------------------------------------------------------------

def gpt2_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257,
                      ctx: int = 1024) -> list[tuple[int, ...]]:
    """The parameter tensors of a GPT-2 (defaults: GPT-2 small, 148 tensors; lm_head is tied to wte)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


@dataclass
class Model:
    name: str
    flat: torch.Tensor  # every tensor is a view into it
    tensors: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def _as_views(name: str, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype,
              scales: Sequence[float], seed: int) -> Model:
    sizes = [math.prod(s) for s in shapes]
    flat = torch.empty(sum(sizes), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    tensors, off = [], 0
    for i, (shape, n) in enumerate(zip(shapes, sizes)):
        t, scale = flat[off:off + n].view(shape), scales[i % len(scales)]
        if _is_float8(dtype):  # torch draws no float8: drawn in float32 and rounded
            t.copy_(torch.empty(shape).normal_(0.0, scale, generator=g))
        else:
            t.normal_(0.0, scale, generator=g)
        tensors.append(t)
        off += n
    return Model(name, flat, tensors)


def _is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def make_models(quick: bool, dtypes: Sequence[str]) -> list[Model]:
    shapes = gpt2_shapes(n_layer=2, vocab=8192) if quick else gpt2_shapes()
    both = shapes + shapes  # parameters, then gradients
    scales = [0.02] * len(shapes) + [1e-4] * len(shapes)  # weights, then gradients
    models = []
    for dt in dtypes:
        dtype = getattr(torch, dt)
        label = "GPT-2 small" + (" (2 layers, 8k vocab)" if quick else "")
        # float8 tensors are stored scaled into the format's range (1e-4 would be 0 in e4m3).
        models.append(_as_views(f"{label}, params+grads, {len(both)} x {dt}", both, dtype,
                                [1.0] if _is_float8(dtype) else scales, seed=0))
    n_tiny = 1000 if quick else 10_000
    g = torch.Generator().manual_seed(1)
    tiny = [(int(n),) for n in torch.randint(1024, 4097, (n_tiny,), generator=g)]
    models.append(_as_views(f"{n_tiny} tiny tensors (1-4k), float32", tiny, torch.float32,
                            [1e-3], seed=2))
    return models


# --- methods -------------------------------------------------------------------

def _wide(x: torch.Tensor) -> torch.Tensor:
    """x, or for float8 (which torch's min, max, sum, isinf and norms refuse) a
    float32 copy, as a user's check of a float8 tensor has to make."""
    return x.float() if _is_float8(x.dtype) else x


def floor_sum(flat: torch.Tensor) -> torch.Tensor:
    """One read of the buffer's bytes: its sum. torch sums no float8, and uint8
    a hundred times slower than float32, so float8 bytes are summed as int64
    (as fast as float32 here; the last numel % 8 bytes are left out)."""
    if not _is_float8(flat.dtype):
        return flat.sum()
    return flat[:flat.numel() - flat.numel() % 8].view(torch.int64).sum()


def pure_python_checks(ts: Sequence[torch.Tensor], histc: bool = True) -> list[tuple]:
    out = []
    for x in map(_wide, ts):
        row = (x.isnan().sum().item(), x.isinf().sum().item(), x.min().item(),
               x.max().item(), x.abs().max().item(), x.sum().item(),
               (x * x).sum().item(), (x == 0).sum().item())
        if histc:  # .float(): histc counts in the input dtype, inexactly for bfloat16
            row += (torch.histc(x.float(), bins=64).sum().item(),)
        out.append(row)
    return out


def isfinite_loop(ts: Sequence[torch.Tensor]) -> bool:
    ok = True
    for x in map(_wide, ts):
        ok &= bool(torch.isfinite(x).all())
    return ok


def foreach_norm_and_unscale(ts: Sequence[torch.Tensor]) -> float:
    ts = [_wide(t) for t in ts]
    norms = torch._foreach_norm(ts)
    found_inf = torch.zeros(1)
    inv_scale = torch.ones(1)  # multiplies by 1: the data is left as it was
    torch._amp_foreach_non_finite_check_and_unscale_(ts, found_inf, inv_scale)
    return torch.stack(norms).float().norm().item() + found_inf.item()


def runnable_kernels() -> list[str]:
    """The CPU kernels of the extension that this CPU runs, widest first (the
    first is the one `auto` picks)."""
    op = torch.ops.torchhealth._cpu_kernel
    current = op("")
    kernels = []
    for name in ["avx512", "avx2", "generic", "scalar"]:
        try:
            op(name)
        except RuntimeError:
            continue
        kernels.append(name)
    op(current)
    return kernels


def _methods(model: Model, kernels: Sequence[str]) -> list[tuple[str, Callable[[], object]]]:
    import torchhealth

    ts = model.tensors
    op = torch.ops.torchhealth._cpu_kernel

    def fused(kernel: str, histogram: bool) -> Callable[[], object]:
        def run():
            op(kernel)
            return torchhealth.tensor_stats(ts, histogram=histogram).data
        return run

    methods = [("floor: torch.sum(flat buffer)", lambda: floor_sum(model.flat))]
    for k in kernels:
        methods.append((f"torchhealth [{k}] with histogram", fused(k, True)))
        methods.append((f"torchhealth [{k}] no histogram", fused(k, False)))
    methods.append((f"raw op [{kernels[0]}] with histogram, no Python checks",
                    lambda: (op(kernels[0]), torch.ops.torchhealth.tensor_stats(ts, True, None))))
    methods += [
        ("pure-Python checks + .item()", lambda: pure_python_checks(ts)),
        ("pure-Python checks without histc", lambda: pure_python_checks(ts, histc=False)),
        ("isfinite(g).all() loop", lambda: isfinite_loop(ts)),
        ("_foreach_norm + _amp_..._unscale_", lambda: foreach_norm_and_unscale(ts)),
    ]
    return methods


def measure(methods: Sequence[tuple[str, Callable[[], object]]], repeat: int,
            progress: Progress | None = None, done: int = 0, total: int = 0) -> dict[str, float]:
    """Minimum seconds per method over `repeat` interleaved rounds (after one warm-up)."""
    best = {name: math.inf for name, _ in methods}
    for r in range(repeat + 1):
        for name, fn in methods:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r > 0:  # round 0 warms up caches, allocator and page tables
                best[name] = min(best[name], dt)
            done += 1
            if progress is not None:
                progress(done, total, name)
    return best


# --- report --------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")


def run(quick: bool = False, repeat: int = 5, dtypes: Sequence[str] = ("float32", "bfloat16"),
        kernels: Sequence[str] | None = None, progress: Progress | None = None) -> str:
    """Runs the benchmark and returns the table (Markdown)."""
    import torchhealth

    if torchhealth.backend().name != "extension":
        raise RuntimeError(f"torchhealth.bench needs the compiled extension: {torchhealth.backend()}")
    if not kernels:  # the vector kernels; the scalar one only where there is none
        kernels = [k for k in runnable_kernels() if k != "scalar"] or ["scalar"]
    kernels = list(kernels)
    previous = torch.ops.torchhealth._cpu_kernel("")
    models = make_models(quick, dtypes)
    per_model = [_methods(m, kernels) for m in models]
    total = sum(len(ms) * (repeat + 1) for ms in per_model)
    lines = [f"Machine: {machine()}. Time: minimum over {repeat} interleaved rounds.", "",
             "| model | method | ms | x floor | x faster than pure-Python |",
             "|---|---|---:|---:|---:|"]
    done = 0
    try:
        for model, methods in zip(models, per_model):
            best = measure(methods, repeat, progress, done, total)
            done += len(methods) * (repeat + 1)
            floor = best[methods[0][0]]
            python = best["pure-Python checks + .item()"]
            head = f"{model.name}, {model.nbytes / 1e6:.0f} MB"
            for name, _ in methods:
                t = best[name]
                lines.append(f"| {head} | {name} | {t * 1e3:.1f} | {t / floor:.2f} | "
                             f"{python / t:.1f} |")
                head = ""
    finally:
        torch.ops.torchhealth._cpu_kernel(previous)
    return "\n".join(lines)


def _print_progress(done: int, total: int, what: str) -> None:
    width = 30
    fill = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {what[:40]:<40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


QUICK_CAVEAT = ("Note: --quick times small models over 2 rounds, so its rows are within timing noise "
                "of each other (even the histogram can look free or negative); compare rows of a full "
                "run only.")


def main(argv: list[str] | None = None, progress: Progress | None = None,
         prog: str = "python -m torchhealth.bench") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small models, 2 rounds (a smoke test)")
    p.add_argument("--repeat", type=int, default=None, help="timed rounds per method (default 5)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="dtypes of the GPT-2 model, comma-separated (default float32,bfloat16)")
    p.add_argument("--kernels", default=None,
                   help="CPU kernels to time, comma-separated, widest first (default: every "
                        "vector kernel this CPU runs)")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr (even when it is not a terminal)")
    args = p.parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 5)
    if repeat < 1:
        p.error("--repeat must be at least 1")
    if progress is None and args.progress:
        progress = _print_progress
    kernels = args.kernels.split(",") if args.kernels else None
    print(run(quick=args.quick, repeat=repeat, dtypes=args.dtypes.split(","), kernels=kernels,
              progress=progress))
    if args.quick:
        print(f"\n{QUICK_CAVEAT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
