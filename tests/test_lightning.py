"""The Lightning callback with the user's own schedulers and Lightning's own TensorBoard logger."""
import warnings

import pytest
import torch

import torchhealth

pl = pytest.importorskip("lightning.pytorch")
from torchhealth.integrations.lightning import HealthCheckCallback  # noqa: E402


def _module(*, nan_at=None, interval="step"):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
            self.scheduler = None

        def training_step(self, batch, i):
            x, y = batch
            if self.global_step == nan_at:
                x = x.clone()
                x[0, 0] = float("nan")
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            self.scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler, "interval": interval}}
    torch.manual_seed(1)
    return Module()


def _fit(module, callbacks, tmp_path, *, steps=5, logger=False):
    torch.manual_seed(0)
    x = torch.randn(80, 8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] ** 2), batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=tmp_path, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about dataloader workers etc.
        trainer.fit(module, data)
    return trainer


def _lr_after(steps: int) -> float:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(steps):
        opt.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


def test_a_skipped_step_holds_back_the_users_step_scheduler(tmp_path):
    for nan_at, held_back in ((2, 1), (None, 0)):
        module, reports = _module(nan_at=nan_at), []
        callback = HealthCheckCallback(sinks=[reports.append])  # default policy: skip non-finite steps
        trainer = _fit(module, [callback], tmp_path, steps=5)
        assert callback.skipped_steps == held_back
        assert module.scheduler.get_last_lr()[0] == _lr_after(5 - held_back)
        assert module.scheduler.last_epoch == 5 - held_back
        # The step after the skipped one ran at the skipped one's rate.
        want = [0.1, 0.05, 0.025, 0.025, 0.0125] if held_back else [0.1, 0.05, 0.025, 0.0125, 0.00625]
        assert [r.scalars["lr"] for r in reports] == pytest.approx(want, rel=1e-15)
        # Lightning holds the user's own scheduler again after fit.
        assert trainer.lr_scheduler_configs[0].scheduler is module.scheduler


def test_a_healthy_run_is_bit_identical_to_one_without_the_callback(tmp_path):
    runs = []
    for callbacks in ([], [HealthCheckCallback()]):
        module = _module()
        _fit(module, callbacks, tmp_path, steps=5)
        runs.append(([p.detach().clone() for p in module.parameters()], module.scheduler.state_dict()))
    (a, sa), (b, sb) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sa == sb and sa["last_epoch"] == 5


def test_an_epoch_scheduler_is_left_alone(tmp_path):
    module = _module(nan_at=1, interval="epoch")
    callback = HealthCheckCallback()
    _fit(module, [callback], tmp_path, steps=10)  # two epochs of 5 batches
    assert callback.skipped_steps == 1 and module.scheduler.last_epoch == 2


def test_a_checkpoint_taken_mid_run_holds_the_users_scheduler_state(tmp_path):
    class Save(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, i):
            if trainer.global_step == 4:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
    module = _module(nan_at=2)
    _fit(module, [HealthCheckCallback(), Save()], tmp_path, steps=5)
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    (state,) = ckpt["lr_schedulers"]
    assert state["last_epoch"] == 3 and set(state) == set(module.scheduler.state_dict())


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    return events


def test_histograms_go_through_lightnings_tensorboard_logger_and_scalars_once(tmp_path):
    pytest.importorskip("tensorboard")
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    module, reports = _module(), []
    callback = HealthCheckCallback(histogram=2, sinks=[reports.append])
    _fit(module, [callback], tmp_path, steps=5, logger=logger)
    events = _events(logger.log_dir)
    tags = events.Tags()
    grads = sorted(t for t in tags["histograms"] if "/grad/" in t)
    assert grads == [f"health_histograms/grad/net.{i}.{k}" for i in (0, 2) for k in ("bias", "weight")]
    for tag in tags["histograms"]:  # on the histogram cadence only: checks 0, 2, 4
        assert [e.step for e in events.Histograms(tag)] == [0, 2, 4]
    h = events.Histograms("health_histograms/grad/net.0.weight")[1].histogram_value
    (row,) = [r for r in reports[2].rows if r.name == "net.0.weight" and r.role == "grad"]
    assert h.num == row.numel and h.max == row.max
    for tag in ("health/grad_norm", "loss"):  # each scalar once per step, not twice
        assert [e.step for e in events.Scalars(tag)] == [0, 1, 2, 3, 4]
    assert not [t for t in tags["scalars"] if t.startswith(("health_tensors/", "user/"))]


def test_histograms_can_be_turned_off_and_need_a_histogram_logger(tmp_path):
    pytest.importorskip("tensorboard")
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    _fit(_module(), [HealthCheckCallback(histogram=True, histograms=False)], tmp_path, steps=2, logger=logger)
    assert _events(logger.log_dir).Tags()["histograms"] == []
    csv = pl.loggers.CSVLogger(tmp_path, name="csv")
    with pytest.warns(UserWarning, match="histograms=True.*no logger"):
        callback = HealthCheckCallback(histograms=True)
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=csv, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        callback.on_train_start(trainer, _module())


def test_two_step_schedulers_of_one_optimizer_are_each_held_back():
    from torchhealth.integrations.lightning import HeldBackScheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    skips = {}
    a = HeldBackScheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), skips)
    b = HeldBackScheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), skips)
    for step in range(4):
        opt.step()
        if step == 1:
            skips[opt] = skips.get(opt, 0) + 1
        a.step()
        b.step()
    assert a.last_epoch == b.last_epoch == 3 and opt.param_groups[0]["lr"] == 0.5 ** 6


def test_lightning_holds_the_users_scheduler_again_after_a_raise(tmp_path):
    module = _module(nan_at=1)
    trainer = None

    class Keep(pl.Callback):
        def on_train_start(self, t, pl_module):
            nonlocal trainer
            trainer = t
    with pytest.raises(torchhealth.HealthCheckError):
        _fit(module, [HealthCheckCallback(policy="raise"), Keep()], tmp_path, steps=3)
    assert trainer.lr_scheduler_configs[0].scheduler is module.scheduler
