"""accelerate's own skip logic sees the steps a HealthCheckedOptimizer skips
(the real package, on the CPU)."""
import warnings

import pytest
import torch

import torchhealth


@pytest.fixture
def accelerate(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    return pytest.importorskip("accelerate")


def _run(accelerator, model, aopt, asched, opt, *, nan_at: int, steps: int = 4):
    """Steps with a NaN input at `nan_at`: what accelerate saw at each step."""
    seen = []
    for step in range(steps):
        x = torch.randn(8, 4)
        if step == nan_at:
            x[0, 0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        aopt.zero_grad()
        accelerator.backward(model(x).pow(2).mean())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torchhealth.HealthWarning)
            aopt.step()
        asched.step()
        seen.append({"skipped": aopt.step_was_skipped, "any": accelerator.optimizer_step_was_skipped,
                     "lr": opt.param_groups[0]["lr"],
                     "moved": not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))})
    return seen


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adam"])
def test_accelerate_sees_a_skipped_step(accelerate, fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    inner = torch.optim.Adam(model.parameters(), lr=1.0, fused=True) if fused else \
        torch.optim.SGD(model.parameters(), lr=1.0)
    opt = torchhealth.HealthCheckedOptimizer(inner, model=model)  # default policy: skip non-finite
    accelerator = accelerate.Accelerator(cpu=True)
    model, aopt, asched = accelerator.prepare(model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    assert type(asched).__name__ == "AcceleratedScheduler"
    seen = _run(accelerator, model, aopt, asched, opt, nan_at=2)
    assert [s["skipped"] for s in seen] == [False, False, True, False]
    assert [s["any"] for s in seen] == [False, False, True, False]
    assert [s["lr"] for s in seen] == [0.5, 0.25, 0.25, 0.125]  # the skipped step did not move it
    assert [s["moved"] for s in seen] == [True, True, False, True]
    assert opt.skipped_steps == 1


def test_accelerate_sees_a_skipped_step_under_its_grad_scaler(accelerate):
    """accelerate's mixed-precision path: it decides from whether the inner step
    was reached, which the wrapper's always is (it declares _step_supports_amp_scaling)."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler
    torch.manual_seed(0)
    accelerate.Accelerator(cpu=True)  # sets up the state AcceleratedOptimizer reads
    model = torch.nn.Linear(4, 1)
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    aopt = AcceleratedOptimizer(opt, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 4))
    asched = AcceleratedScheduler(sched, aopt)

    class Scaled:  # accelerator.backward would scale with its own (absent) scaler
        def backward(self, loss):
            aopt.scaler.scale(loss).backward()

        optimizer_step_was_skipped = property(lambda self: aopt.step_was_skipped)
    seen = _run(Scaled(), model, aopt, asched, opt, nan_at=1, steps=3)
    assert [s["skipped"] for s in seen] == [False, True, False]
    assert [s["lr"] for s in seen] == [0.5, 0.5, 0.25]
    assert [s["moved"] for s in seen] == [True, False, True]
