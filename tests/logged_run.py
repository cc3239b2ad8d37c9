"""Reports from real training through `HealthCheckedOptimizer`, for the sink,
report and CLI tests."""
import warnings

import torch

import torchhealth
from torchhealth import HealthCheckedOptimizer, HealthWarning
from torchhealth.report import Report


def loss_of_step(model, step: int, nan_at: int | None) -> torch.Tensor:
    """The loss of one step on fresh synthetic data (x -> x0^2), with one NaN
    in the input at step `nan_at`."""
    x = torch.randn(32, 16)
    if step == nan_at:
        x[0, 0] = float("nan")
    return ((model(x) - x[:, :1] ** 2) ** 2).mean()


def train(steps: int = 40, nan_at: int | None = 30, on_report=None, *, on_result=None,
          check_every: int = 1) -> list[Report]:
    """A small MLP trained with Adam on synthetic data and checked every
    `check_every` steps (with histograms); one NaN is put in the input at step
    `nan_at`, so that step's gradients are non-finite and the default policy
    skips it. Returns every Report; `on_report` gets each one as it comes,
    `on_result` each `CheckResult` (None between checks; then no Report is
    built unless asked for, and none is returned)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 1))
    out: list[Report] = []
    opt = HealthCheckedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model=model,
                                 histogram=True, check_every=check_every,
                                 on_report=out.append if on_result is None else None)
    if on_report is not None:
        opt.monitor.on_report(on_report)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        for step in range(steps):
            opt.zero_grad()
            loss_of_step(model, step, nan_at).backward()
            if on_result is None:
                opt.step()
            else:  # the same check, with the CheckResult in hand
                result = opt.monitor.check(step)
                on_result(result)
                torchhealth.policy.predicated_step(opt.optimizer, result.skip if result else None)
        opt.flush()
    return out
