"""The ``torchhealth`` command line.

    torchhealth demo [--scenario NAME] [--steps N] [--log-dir DIR]
    torchhealth bench [ARGS...]
    torchhealth report RUN.jsonl [-o report.html] [--partial] [--run N] [--heatmaps N | --heatmap PATTERN ...]
    torchhealth doctor
    torchhealth --version

Results go to stdout, progress bars and errors to stderr. An error is one line
on stderr and a nonzero exit status (2 for bad arguments, 1 otherwise), never
a traceback (`torchhealth.cli_support`). The report command is in
`torchhealth.cli_report`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from . import cli_report
from .cli_support import EXIT_USAGE, CommandError, Parser, Progress

__all__ = ["CommandError", "Progress", "main"]


# -- demo ----------------------------------------------------------------------------------
def _demo(args) -> int:
    from . import demo
    if args.scenario not in demo.SCENARIOS:
        raise CommandError(f"torchhealth demo: unknown scenario {args.scenario!r}; choose one of "
                           f"{', '.join(demo.SCENARIOS)}", EXIT_USAGE)
    if args.steps is not None and args.steps < 1:
        raise CommandError("torchhealth demo: --steps must be at least 1", EXIT_USAGE)
    return demo.present(args.scenario, steps=args.steps, log_dir=args.log_dir,
                        progress=Progress(f"training ({args.scenario})"))


# -- bench -----------------------------------------------------------------------------------
def _bench(argv: list[str]) -> int:
    try:
        from . import bench
    except ImportError as e:
        raise CommandError(f"torchhealth bench: the benchmark is not available ({e})") from e
    # The bar of every command: live on a terminal, else one final line (and
    # live with --progress, which asks for it).
    bar = Progress("benchmark", unit="run", live=True if "--progress" in argv else None)
    try:
        status = bench.main(argv, progress=bar, prog="torchhealth bench")
    finally:
        bar.close()
    return int(status or 0)


# -- doctor ------------------------------------------------------------------------------------
def _compiler_of(path: str) -> str | None:
    """The compiler recorded in a shared library's .comment section."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    found = re.findall(rb"(GCC: \([^)]*\) [\w.\-]+|clang version [\w.\-]+)", data)
    return found[-1].decode(errors="replace") if found else None


def _cuda_archs_of(path: str) -> list[str]:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    return sorted({m.decode() for m in re.findall(rb"\bsm_\d{2,3}a?\b", data)})


def _torch_config() -> dict[str, str]:
    import torch
    cfg = torch.__config__.show()
    out = {}
    for key, pattern in (("compiler", r"^\s*-\s*(GCC [\w.]+|clang [\w.]+|MSVC [\w.]+)"),
                         ("C++", r"C\+\+ Version: (\w+)"), ("OpenMP", r"- OpenMP (\d+)"),
                         ("CPU capability", r"CPU capability usage: (\w+)")):
        m = re.search(pattern, cfg, re.MULTILINE)
        if m:
            out[key] = m.group(1)
    return out


CPU_KERNELS = ("auto", "scalar", "avx2", "avx512")


def _cpu_kernel() -> str:
    """The CPU kernels in use; a CommandError when TORCHHEALTH_CPU_KERNEL asks
    for kernels that do not exist or that this CPU cannot run."""
    import torch
    want = os.environ.get("TORCHHEALTH_CPU_KERNEL", "")
    if want and want not in CPU_KERNELS:
        raise CommandError(f"torchhealth doctor: TORCHHEALTH_CPU_KERNEL={want!r} is not a valid value; "
                           f"the valid values are {', '.join(CPU_KERNELS)} (or unset it)")
    try:
        return torch.ops.torchhealth._cpu_kernel("")
    except RuntimeError as e:  # e.g. avx512 asked for on a CPU without it
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CommandError(f"torchhealth doctor: {reason}; the valid values of TORCHHEALTH_CPU_KERNEL "
                           f"are {', '.join(CPU_KERNELS)} (or unset it)") from e


def _doctor(args) -> int:
    import torch

    import torchhealth
    from torchhealth import reference
    from torchhealth.stats import SUM, SUMSQ
    b = torchhealth.backend()
    print(f"torchhealth {torchhealth.__version__} ({Path(torchhealth.__file__).parent})")
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'not built'}, "
          f"GPU available: {'yes' if torch.cuda.is_available() else 'no'})")
    cfg = _torch_config()
    print("torch built " + ", ".join(f"{k} {v}" for k, v in cfg.items()))
    print(f"threads     torch.get_num_threads() = {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'not set')})")
    print(f"backend     {b.name}: {b.reason}")
    if b.name != "extension":
        raise CommandError(
            "torchhealth doctor: the compiled extension is not in use, so tensor_stats runs the slow "
            "pure-PyTorch reference. Rebuild it from the source tree with "
            "`pip install --no-build-isolation -e .` (a C++ compiler and the same torch are needed)")
    so = torchhealth._C.__file__
    print(f"extension   {so}")
    print(f"  compiler  {_compiler_of(so) or 'unknown (no .comment section)'}")
    print(f"  CPU       kernel {_cpu_kernel()} (chosen at run time; "
          f"TORCHHEALTH_CPU_KERNEL={'|'.join(CPU_KERNELS)} forces one)")
    if b.cuda:
        archs = _cuda_archs_of(so)
        print(f"  CUDA      kernels compiled in; architectures: {', '.join(archs) or 'unknown'}"
              f" (torch's: {', '.join(torch.cuda.get_arch_list()) or 'none'})")
    else:
        print("  CUDA      no CUDA kernels (CPU build)")
    # A small check that the kernels agree with the reference.
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 3e-5, 1e-40, float("nan"), float("inf"), -float("inf"),
                      65504.0, -1e30, 0.1], dtype=torch.float32)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        try:
            got = torchhealth.tensor_stats([x.to(dtype)]).data
        except Exception as e:  # any failure of the compiled op is what doctor reports
            raise CommandError(f"torchhealth doctor: the extension fails on {dtype}: "
                               f"{type(e).__name__}: {e}. Rebuild it with "
                               "`pip install --no-build-isolation -e .`") from e
        want = reference.tensor_stats([x.to(dtype)])
        exact = [c for c in range(got.shape[1]) if c not in (SUM, SUMSQ)]
        if got.shape != want.shape or not torch.equal(got[:, exact], want[:, exact]):
            raise CommandError(f"torchhealth doctor: the extension disagrees with the reference on "
                               f"{dtype}; it is broken or stale: rebuild it with "
                               "`pip install --no-build-isolation -e .`")
    print("self-test   tensor_stats agrees with the reference on float32, float64, bfloat16, float16")
    print("OK")
    return 0


# -- main ---------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="torchhealth", description="Health statistics for PyTorch training: demo, "
                "benchmark, HTML report of a logged run, installation check.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"torchhealth {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    d = sub.add_parser("demo", help="train a small model, inject a fault, show what torchhealth saw",
                       prog="torchhealth demo")
    d.add_argument("--scenario", default="nan", help="which fault (default: nan); "
                   "`torchhealth demo --list` shows them")
    d.add_argument("--list", action="store_true", help="list the scenarios and exit")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the scenario's)")
    d.add_argument("--log-dir", default="runs/demo", help="where run.jsonl and report.html go "
                   "(default: runs/demo)")
    sub.add_parser("bench", help="benchmark tensor_stats against plain PyTorch checks "
                   "(arguments go to the benchmark)", prog="torchhealth bench", add_help=False)
    cli_report.add_parser(sub)
    sub.add_parser("doctor", help="which backend runs, how it was built, and whether it works",
                   prog="torchhealth doctor")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:  # everything after it belongs to the benchmark
            return _bench(argv[1:])
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if args.command == "demo":
            if args.list:
                from .demo import SCENARIOS
                for name, text in SCENARIOS.items():
                    print(f"{name:<10} {text}")
                return 0
            return _demo(args)
        return {"report": cli_report.run, "doctor": _doctor}[args.command](args)
    except CommandError as e:
        print(str(e), file=sys.stderr)
        return e.status
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("torchhealth: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
