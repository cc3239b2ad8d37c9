"""A real training run that logs the user's scalars (loss and learning rate)
with `HealthCheckedOptimizer.log`; for the report tests."""
import warnings

import torch

from torchhealth import HealthCheckedOptimizer, HealthWarning
from torchhealth.report import Report

from logged_run import loss_of_step


def train_with_scalars(steps: int = 40, nan_at: int | None = 30, *, histogram: bool = True,
                       width: int = 64, depth: int = 2, check_every: int = 1) -> list[Report]:
    """An MLP of `depth` hidden layers trained with SGD and a step-decayed
    learning rate; one NaN in the input at step `nan_at` (its loss is NaN).
    Each step logs ``loss`` (the tensor) and ``lr`` before ``opt.step()``."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, width), torch.nn.Tanh()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=10, gamma=0.5)
    out: list[Report] = []
    opt = HealthCheckedOptimizer(sgd, model=model, histogram=histogram, on_report=out.append,
                                 check_every=check_every)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        for step in range(steps):
            opt.zero_grad()
            loss = loss_of_step(model, step, nan_at)
            loss.backward()
            opt.log(loss=loss, lr=sched.get_last_lr()[0])
            opt.step()
            sched.step()
    return out
