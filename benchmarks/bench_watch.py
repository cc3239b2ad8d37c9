"""Cost of the end-of-backward check and of `torchhealth.watch`, against
`torch.autograd.detect_anomaly`, on a Hugging Face GPT-2 (random init from
`GPT2Config`, nothing downloaded), on the CPU.

Arms, interleaved step by step in an order drawn afresh each round (seeded),
so that the noise of a shared machine, and whatever one arm leaves behind for
the next (anomaly mode's freed graph), falls on all of them alike. All arms
train one and the same model with one and the same AdamW: an arm's monitor,
hooks and watch are attached just before its step and removed just after it,
outside the timed region. (With a model per arm, each instance's memory layout
alone shifted its step time by several percent, more than the costs measured
here.)

- plain:        AdamW alone
- plain again:  a second, identical plain arm: what identical work measures on this
                machine, the noise floor of the table
- step check:   HealthCheckedOptimizer, checks at optimizer-step time (at_backward_end=False)
- backward end: HealthCheckedOptimizer, checks when backward finishes (the default with model=)
- watch:        backward end, plus watch() on every module, every step
- watch alone:  AdamW alone, plus watch() on every module, every step, without a
                monitor (the watch delivers its own Reports): watch's own cost against
                the same plain arm as anomaly mode's
- anomaly:      AdamW alone inside torch.autograd.detect_anomaly()
- compared:     with ``--compare-watch FILE``, the watch arm with the `watch` of another
                version of torchhealth/watch.py (e.g. ``git show main:torchhealth/watch.py``),
                so that two versions are measured side by side in one run

The goal is stated on the added time: watch's arm over plain, and watch's own
part (over the backward-end arm), against what anomaly mode adds. Each ratio is
given with a 90% bootstrap interval over the steps (resampled rounds), which is
the noise of the run, and from each arm's fastest step (other processes
only ever add time); then paired: the median of each round's difference
between the two arms over that of anomaly and plain (the arms of a round run
back to back, so a load that changes from round to round leaves the
differences alone). ``--clock cpu`` times the process's CPU time instead of
the wall clock: with ``--threads 1`` it is the step's own work, much less
disturbed by other processes on a shared machine than wall time.

    .venv/bin/python benchmarks/bench_watch.py [--steps 12] [--warmup 2] [--threads N] [--clock wall|cpu]
        [--compare-watch FILE] [--only]

``--only``: time the four arms the goal needs (plain, backward end, watch,
anomaly) and no others, so that more rounds fit in the same time.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import pathlib
import platform
import random
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's torchhealth
import torchhealth as th  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def added_ratio(times: dict[str, list[float]], arm: str, base: str, rounds: list[int], pick=statistics.median
                ) -> float:
    """(arm - base) / (anomaly - plain), each arm's time `pick`ed (median, min) over `rounds`."""
    at = {k: pick([times[k][i] for i in rounds]) for k in (arm, base, "anomaly", "plain")}
    return (at[arm] - at[base]) / (at["anomaly"] - at["plain"])


def paired_ratio(times: dict[str, list[float]], arm: str, base: str, rounds: list[int]) -> float:
    """median over rounds of (arm - base) / median over rounds of (anomaly - plain):
    differences within each round, whose arms ran back to back, so that load that
    changes between rounds falls out of both."""
    def added(a, b):
        return statistics.median(times[a][i] - times[b][i] for i in rounds)
    return added(arm, base) / added("anomaly", "plain")


def with_interval(times: dict[str, list[float]], arm: str, base: str, resamples: int = 2000,
                  ratio=added_ratio) -> str:
    """The ratio, its 90% bootstrap interval over resampled rounds, and (for the
    ratio of medians) the ratio of each arm's fastest step."""
    n = len(times["plain"])
    rng = random.Random(0)
    boot = sorted(ratio(times, arm, base, [rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    lo, hi = boot[int(0.05 * resamples)], boot[int(0.95 * resamples) - 1]
    fastest = "" if ratio is not added_ratio else \
        f"; {added_ratio(times, arm, base, list(range(n)), min):.3f} from each arm's fastest step"
    return f"{ratio(times, arm, base, list(range(n))):.3f} (90% interval {lo:.3f} to {hi:.3f}{fastest})"


def load_watch(path: str):
    """The `watch` of another version of watch.py, loaded as a module of this torchhealth."""
    spec = importlib.util.spec_from_file_location("torchhealth._compared_watch", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.watch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--compare-watch", metavar="FILE", help="also time the watch arm with this watch.py")
    ap.add_argument("--only", action="store_true", help="only plain, backward end, watch and anomaly")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=2000, n_positions=128, n_embd=256, n_layer=args.layers,
                                     n_head=4)
    ids = torch.randint(0, 2000, (8, 128), generator=torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    watches = {"watch": th.watch, "compared": args.compare_watch and load_watch(args.compare_watch)}

    def wrapper():  # checks at step time; the backward-end hooks are attached per step
        return th.HealthCheckedOptimizer(inner, model=model, at_backward_end=False)

    kinds = ["plain", "plain again", "step check", "backward end", "watch", "watch alone", "anomaly"] + \
        ["compared"] * bool(args.compare_watch)
    if args.only:
        kinds = [k for k in kinds if k in ("plain", "backward end", "watch", "anomaly", "compared")]
    plain = ("plain", "plain again", "anomaly", "watch alone")
    optimizers = {k: inner if k in plain else wrapper() for k in kinds}

    def attach(kind) -> list:
        """What `kind` adds to the model for one step: handles to remove after it."""
        opt = optimizers[kind]
        if kind == "watch alone":
            return [th.watch(model)]
        if kind in ("plain", "plain again", "anomaly", "step check"):
            return []
        handles = [opt.monitor.check_at_backward_end(lambda: opt.steps)]
        return handles + [watches[kind](model, monitor=opt)] if kind in watches else handles

    times: dict[str, list[float]] = {k: [] for k in kinds}
    warnings.simplefilter("ignore")
    load = os.getloadavg()[0]
    shuffle = random.Random(0).shuffle
    for step in range(args.warmup + args.steps):
        order = list(kinds)
        shuffle(order)
        for k in order:
            opt, handles = optimizers[k], attach(k)
            ctx = torch.autograd.detect_anomaly() if k == "anomaly" else contextlib.nullcontext()
            t0 = clock()
            with ctx:
                opt.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                if k == "watch alone":
                    handles[0].flush()  # its Report, which a next step would deliver
            if step >= args.warmup:
                times[k].append(clock() - t0)
            for h in handles:
                h.remove()
    n_params = sum(p.numel() for p in model.parameters())
    base = statistics.median(times["plain"])
    print(f"GPT-2 ({args.layers} layers, n_embd 256, {n_params / 1e6:.1f}M parameters), batch 8 x 128 "
          f"tokens, {args.steps} steps after {args.warmup} warm-up, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, {cpu_name()}, load average "
          f"{load:.1f} -> {os.getloadavg()[0]:.1f}; torchhealth from {pathlib.Path(th.__file__).parent}")
    print("| arm | median step (ms) | x plain | added vs plain |")
    print("|---|---:|---:|---:|")
    for k in kinds:
        m = statistics.median(times[k])
        print(f"| {k} | {1e3 * m:.1f} | {m / base:.3f} | {100 * (m / base - 1):+.1f}% |")
    if "plain again" in times:
        noise = statistics.median(times["plain again"]) / base - 1
        print(f"\nidentical work (plain again over plain) measures {100 * noise:+.1f}%: arms closer "
              "than that to each other are not told apart by this run")
    if statistics.median(times["anomaly"]) > base:
        print(f"\nof what anomaly mode adds, the watch arm adds {with_interval(times, 'watch', 'plain')}, "
              f"and watch itself (over the backward-end arm) {with_interval(times, 'watch', 'backward end')}"
              f" (goal: at most 0.1)")
        print(f"paired within each round (median of the per-round differences): the watch arm "
              f"{with_interval(times, 'watch', 'plain', ratio=paired_ratio)}, watch itself "
              f"{with_interval(times, 'watch', 'backward end', ratio=paired_ratio)}")
        if "watch alone" in times:
            print(f"watch alone (no monitor) over plain: {with_interval(times, 'watch alone', 'plain')}; "
                  f"paired {with_interval(times, 'watch alone', 'plain', ratio=paired_ratio)}")
        if args.compare_watch:
            print(f"the compared watch ({args.compare_watch}) adds {with_interval(times, 'compared', 'plain')}, "
                  f"and itself {with_interval(times, 'compared', 'backward end')}; this watch over the "
                  f"compared one: {with_interval(times, 'watch', 'compared')}")


if __name__ == "__main__":
    main()
