"""The demo: train a small model on synthetic data with `HealthCheckedOptimizer`,
inject one of the failures people actually hit, and show what torchhealth saw.
(Over 300 lines: the six scenarios are data, a small model and an injected fault each.)

    python -m torchhealth.demo --scenario nan          # or: bash scripts/demo.sh

`run` trains and returns every step's `Report` (it never prints); `present` is
what ``torchhealth demo`` prints, keeping a bounded summary instead of the
Reports; `main` runs ``torchhealth demo`` (one parser, in `torchhealth.cli`).
`setup` builds a scenario's model, optimizer and data, faulty or healthy (the
tests train both).
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .optim import HealthCheckedOptimizer
from .policy import HealthWarning
from .report import Report

SCENARIOS: dict[str, str] = {
    "nan": "one NaN in one input batch: non-finite gradients; the step is skipped",
    "lr": "Adam with lr=1000 on a small MLP: exploding, then non-finite gradients",
    "vanishing": "a deep stack of Linear + Sigmoid layers: vanishing gradients",
    "fp16": "float16 weights growing toward 65504: headroom warning before they overflow",
    "dead": "a layer cut off from the loss mid-run (detached by mistake): dead parameters",
    "relu": "a ReLU network with a large negative bias: dead units, vanishing gradients",
}


@dataclass
class Setup:
    """One scenario, ready to train: ``batch(i)`` is step i's (inputs, targets)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    steps: int
    model_text: str  # what is trained, for people
    injected: str  # what goes wrong, for people ("" when healthy)
    inject_step: int | None  # the step the fault appears (None: from the start)
    expect: tuple[str, ...]  # checks that should catch it, in the order they should fire


class _MLP(nn.Module):
    def __init__(self, sizes, act=nn.Tanh, aux: bool = False, detach_aux_from: int | None = None):
        super().__init__()
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), act()]
        self.net = nn.Sequential(*layers[:-1])
        # A side branch added to the output; from training forward number
        # `detach_aux_from` on (0: always) it is detached, so the loss stops
        # reaching it.
        self.aux = nn.Linear(sizes[0], sizes[-1]) if aux else None
        self.detach_aux_from = detach_aux_from
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.aux is not None:
            side = self.aux(x)
            if self.detach_aux_from is not None and self.calls >= self.detach_aux_from:
                side = side.detach()
            out = out + side
            self.calls += self.training
        return out


def _regression(seed: int, features: int, batch: int = 64, scale: float = 1.0,
                nan_at: int | None = None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(features, 1, generator=g)

    def batch_fn(i: int):
        gi = torch.Generator().manual_seed(seed * 1000 + i)
        x = torch.randn(batch, features, generator=gi) * scale
        y = torch.sin(x @ w)
        if i == nan_at:
            x[3, 5] = math.nan  # one bad value in one batch: a corrupt record
        return x.to(dtype), y.to(dtype)

    return batch_fn


def _mse(out, y):
    return nn.functional.mse_loss(out.float(), y.float())


def setup(scenario: str = "nan", *, healthy: bool = False, seed: int = 0,
          steps: int | None = None) -> Setup:
    """The model, optimizer and data of `scenario`, with the fault injected, or
    (``healthy=True``) the same model trained without it. ``steps`` overrides
    the scenario's number of steps (a fault injected at one step then comes
    before the middle of a shorter run)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    torch.manual_seed(seed)
    if scenario == "nan":
        model = _MLP([16, 64, 64, 1])
        n = 30 if steps is None else steps
        at = None if healthy else min(12, n // 2)
        return Setup(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                     _regression(seed, 16, nan_at=at), _mse, n,
                     "an MLP 16-64-64-1 (Tanh), Adam lr=1e-3, synthetic regression data",
                     "" if healthy else f"at step {at} one value of one input batch is NaN",
                     at, ("nonfinite",))
    if scenario == "lr":
        model = _MLP([16, 64, 64, 64, 64, 1], act=nn.ReLU)
        lr = 1e-3 if healthy else 1000.0
        return Setup(model, torch.optim.Adam(model.parameters(), lr=lr),
                     _regression(seed, 16), _mse, 12,
                     f"an MLP 16-64-64-64-64-1 (ReLU), Adam lr={lr:g}, synthetic regression data",
                     "" if healthy else "the learning rate is 1000 (a typo for 1e-3?)",
                     None, ("exploding", "nonfinite"))
    if scenario == "vanishing":
        depth = 3 if healthy else 12
        model = _MLP([16] + [32] * depth + [1], act=nn.Sigmoid)
        return Setup(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     _regression(seed, 16), _mse, 15,
                     f"{depth + 1} Linear layers with Sigmoid between them, SGD lr=0.1",
                     "" if healthy else "12 sigmoid layers deep: each multiplies the gradient "
                     "by at most 1/4 on its way back", None, ("vanishing",))
    if scenario == "fp16":
        model = nn.Linear(4, 1).half()
        lr = 1.0 if healthy else 4e3

        def reward(out, y):  # rewards large outputs: the weights grow every step
            return -out.float().mean()

        return Setup(model, torch.optim.SGD(model.parameters(), lr=lr),
                     _positive(seed, 4), reward, 20,
                     f"a float16 Linear 4-1, SGD lr={lr:g}, a loss that rewards large outputs",
                     "" if healthy else "a learning rate that grows the float16 weights by "
                     "~4000 per step (the bias; the weights ~400), toward float16's maximum 65504", None,
                     ("headroom", "nonfinite"))
    if scenario == "dead":
        at = None if healthy else 3
        model = _MLP([16, 64, 1], aux=True, detach_aux_from=at)
        return Setup(model, torch.optim.SGD(model.parameters(), lr=0.05),
                     _regression(seed, 16), _mse, 10,
                     "an MLP 16-64-1 with a side branch `aux` (Linear 16-1) added to its output, "
                     "SGD lr=0.05",
                     "" if healthy else f"from step {at} on, the output of `aux` is detached (a freeze "
                     "meant for another layer): its parameters stop getting gradients",
                     at, ("dead",))
    # relu
    model = _MLP([16, 64, 64, 1], act=nn.ReLU)
    if not healthy:
        with torch.no_grad():
            model.net[0].bias.fill_(-10.0)  # every unit of the first layer starts dead
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.05),
                 _regression(seed, 16), _mse, 10,
                 "an MLP 16-64-64-1 (ReLU), SGD lr=0.05",
                 "" if healthy else "the first layer's bias is -10: no ReLU unit ever fires",
                 None, ("vanishing", "dead"))


def _positive(seed: int, features: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(64, features, generator=g) * 0.2).half()  # mean 0.1: weights grow ~0.1 * lr
    return lambda i: (x, torch.zeros(64, 1, dtype=torch.float16))


def train(s: Setup, *, steps: int | None = None, on_report=None, progress=None,
          **options) -> list[Report]:
    """Trains `s` with `HealthCheckedOptimizer` (``options`` go to it: policy,
    thresholds, sync, ...) and returns the Report of every step."""
    reports: list[Report] = []

    def collect(report: Report) -> None:
        reports.append(report)
        if on_report is not None:
            on_report(report)

    _train(s, steps=steps, on_report=collect, progress=progress, **options)
    return reports


def _train(s: Setup, *, steps: int | None, on_report, progress, **options) -> None:
    steps = s.steps if steps is None else steps
    opt = HealthCheckedOptimizer(s.optimizer, model=s.model, on_report=on_report, **options)
    for i in range(steps):
        x, y = s.batch(i)
        opt.zero_grad()
        s.loss(s.model(x), y).backward()
        opt.step()
        if progress is not None:
            progress(i + 1, steps)
    opt.flush()


def run(scenario: str = "nan", *, steps: int | None = None,
        log_dir: str | os.PathLike | None = None, on_report=None, progress=None) -> list[Report]:
    """Trains `scenario` (see `SCENARIOS`) with the default policy and returns
    every step's Report. With `log_dir`, writes ``<log_dir>/run.jsonl`` (replacing
    an earlier demo log) and, when matplotlib is importable,
    ``<log_dir>/report.html``. Health warnings are not emitted: the Reports
    hold them. ``progress(i, total)`` is called after each step."""
    reports: list[Report] = []
    _logged(setup(scenario, steps=steps), steps=steps, log_dir=log_dir,
            on_report=[reports.append] + ([on_report] if on_report is not None else []), progress=progress)
    return reports


def _logged(s: Setup, *, steps: int | None, log_dir: str | os.PathLike | None, on_report: list,
            progress) -> None:
    """Trains `s` (histograms on, health warnings kept in the Reports), giving
    each Report to the log in `log_dir` and then to each of `on_report`; keeps
    none. The HTML report is made from the log once training is over."""
    sink = None
    callbacks = list(on_report)
    if log_dir is not None:
        from .sinks import JsonlSink

        log = Path(log_dir) / "run.jsonl"
        log.unlink(missing_ok=True)
        sink = JsonlSink(log)
        callbacks.insert(0, sink)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HealthWarning)
            _train(s, steps=steps, progress=progress, histogram=True,
                   on_report=lambda r: [cb(r) for cb in callbacks])
    finally:
        if sink is not None:
            sink.close()
    if log_dir is not None and _has_matplotlib():
        from .html_report import write_report
        from .sinks import read_jsonl

        write_report(read_jsonl(Path(log_dir) / "run.jsonl"), Path(log_dir) / "report.html")


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


# -- the command line -------------------------------------------------------------------
def _status(r: Report) -> str:
    if not r.findings:
        return "ok"
    checks = ", ".join(dict.fromkeys(f.check for f in r.findings))
    return f"{r.status}: {checks}" + ("  -> step skipped" if r.skipped else "")


class _Summary:
    """What `present` prints, gathered as the Reports arrive, in memory that
    does not grow with the number of steps: one line per shown step (the
    first, the last, each change of status, the few steps before the first
    finding; at most `max_lines` of them), the first Report with a finding,
    and counts."""

    BEFORE = 3  # steps shown before the first finding

    def __init__(self, max_lines: int = 60):
        self.max_lines = max_lines
        self.shown: dict[int, tuple] = {}  # index -> (step, grad norm, param norm, status)
        self.recent: deque[tuple] = deque(maxlen=self.BEFORE)
        self.steps = self.fired = self.skipped = self.unshown = 0
        self.first: Report | None = None
        self.first_by_check: dict[str, int] = {}
        self.actions: dict[str, None] = {}

    def __call__(self, r: Report) -> None:
        i, line = self.steps, (r.step, r.grad_norm, r.param_norm, _status(r))
        if r.findings and self.first is None:
            self.first = r
            self.shown.update({j: old for j, old in self.recent})
        if i == 0 or line[3] != self.recent[-1][1][3]:
            if len(self.shown) < self.max_lines:
                self.shown[i] = line
            else:
                self.unshown += 1
        self.recent.append((i, line))
        self.steps += 1
        self.skipped += r.skipped
        if r.findings:
            self.fired += 1
            self.actions.update(dict.fromkeys(r.actions))
            for f in r.findings:
                self.first_by_check.setdefault(f.check, r.step)

    def table(self) -> list[str]:
        """The per-step lines, with a line for each gap between them."""
        shown = dict(self.shown)
        if self.recent:
            shown.setdefault(*self.recent[-1])
        out, last = [], -1
        for i in sorted(shown):
            if i > last + 1:
                same = "" if self.unshown else ", status unchanged"  # else some changes were not kept
                out.append(f"  ...  ({i - last - 1} more step(s){same})")
            step, grad, param, status = shown[i]
            out.append(f"{step:>5}  {grad:>10.4g}  {param:>10.4g}  {status}")
            last = i
        return out


def main(argv: list[str] | None = None) -> int:
    """``python -m torchhealth.demo [ARGS]``: the same command as ``torchhealth
    demo [ARGS]`` (one parser, in `torchhealth.cli`). Bad arguments exit with
    status 2 (SystemExit), as argparse does."""
    from . import cli

    status = cli.main(["demo", *(sys.argv[1:] if argv is None else argv)])
    if status == cli.EXIT_USAGE:
        raise SystemExit(status)
    return status


def present(scenario: str, *, steps: int | None = None, log_dir: str | os.PathLike = "runs/demo",
            progress=None) -> int:
    """Runs the demo and prints what it injected, what torchhealth saw and where
    the log and report went: the output of ``python -m torchhealth.demo`` and
    ``torchhealth demo``. ``progress(i, total)`` is called after each step; its
    ``close()``, if it has one, before the results are printed."""
    s = setup(scenario, steps=steps)
    n_steps = s.steps if steps is None else steps
    p = print
    p(f"torchhealth demo, scenario '{scenario}': {SCENARIOS[scenario]}")
    p(f"  model     : {s.model_text}, {sum(q.numel() for q in s.model.parameters()):,} parameters")
    p(f"  injected  : {s.injected}")
    p(f"  expected  : caught by the {' check, then the '.join(s.expect)} check")
    p("  watching  : HealthCheckedOptimizer, check_every=1, default policy (non-finite -> skip the "
      "step; exploding, vanishing, headroom, dead -> warn)")
    p(f"  training  : {n_steps} steps on the CPU\n", flush=True)
    t0 = time.perf_counter()
    summary = _Summary()
    try:
        _logged(s, steps=steps, log_dir=log_dir, on_report=[summary], progress=progress)
    finally:
        getattr(progress, "close", lambda: None)()
    elapsed = time.perf_counter() - t0

    p(f"{'step':>5}  {'grad norm':>10}  {'param norm':>10}  status")
    for line in summary.table():
        p(line)
    p("  (norms are L2 norms over the finite values: gradients that are all NaN read 0)")
    p("")
    first = summary.first
    if first is None:
        p("torchhealth saw nothing wrong.")
    else:
        p(f"What torchhealth saw: first finding at step {first.step} "
          f"({summary.fired} of {summary.steps} steps had findings).")
        for check, step in summary.first_by_check.items():
            p(f"  {check:<10} first fired at step {step}")
        p(f"\nThe report of step {first.step} (str(report); report.to_dict() is the JSON form):")
        p(str(first))
        actions = list(summary.actions)
        p("\nWhat was done: " + ("; ".join(actions) if actions else "recorded only") +
          (f". {summary.skipped} step(s) skipped in total: parameters and optimizer state stayed exactly "
           "as before each of them." if summary.skipped else "."))
        p("  (change it per check: policy={'nonfinite': 'raise', 'exploding': 'skip', ...})")
    p("")
    log, html = Path(log_dir) / "run.jsonl", Path(log_dir) / "report.html"
    p(f"Log   : {log} ({summary.steps} reports, one JSON object per line; "
      f"torchhealth.sinks.read_jsonl reads it back)")
    if _has_matplotlib():
        p(f"Report: {html} (norms, histograms, findings; open it in a browser)")
    else:
        p(f"Report: not written (needs matplotlib: pip install 'torchhealth[report]'); "
          f"later: torchhealth report {log} -o {html}")
    p(f"Done in {elapsed:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
