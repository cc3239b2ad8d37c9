"""A real training run whose Reports carry the user's scalars (loss and learning
rate), as `Report.scalars` will once the monitor logs them; for the report tests."""
import warnings

import torch

from torchhealth import HealthCheckedOptimizer, HealthWarning
from torchhealth.report import Report


def train_with_scalars(steps: int = 40, nan_at: int | None = 30, *, histogram: bool = True,
                       width: int = 64, depth: int = 2) -> list[Report]:
    """An MLP of `depth` hidden layers trained with SGD and a step-decayed
    learning rate; one NaN in the input at step `nan_at`. Each Report gets
    ``scalars = {"loss": ..., "lr": ...}`` of its step."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, width), torch.nn.Tanh()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=10, gamma=0.5)
    out: list[Report] = []
    now: dict[str, float] = {}

    def keep(report: Report) -> None:
        report.scalars = dict(now)
        out.append(report)

    opt = HealthCheckedOptimizer(sgd, model=model, histogram=histogram, on_report=keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        for step in range(steps):
            x = torch.randn(32, 16)
            if step == nan_at:
                x[0, 0] = float("nan")
            loss = ((model(x) - x[:, :1] ** 2) ** 2).mean()
            now.update(loss=loss.item(), lr=sched.get_last_lr()[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return out
