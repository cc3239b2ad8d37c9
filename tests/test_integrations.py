"""The Lightning and transformers callbacks, with the real frameworks on the CPU."""
import contextlib
import csv
import os
import sys
import warnings

import pytest
import torch

import torchhealth
from torchhealth.sinks import JsonlSink, read_jsonl
from torchhealth.stats import SUM_RTOL  # the documented bound of the float64 sums


# -- Lightning -------------------------------------------------------------------------------
def _lightning_module(pl, *, fused: bool = False, nan_at: int | None = None):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
            self.seen_norms = []  # the gradient norm the module's own hook sees, after the callback's

        def training_step(self, batch, i):
            x, y = batch
            if self.global_step == nan_at:
                x = x.clone()
                x[0, 0] = float("nan")
            return torch.nn.functional.mse_loss(self.net(x).float(), y)

        def on_before_optimizer_step(self, optimizer):
            grads = [p.grad.double() for p in self.parameters() if p.grad is not None]
            self.seen_norms.append(torch.sqrt(sum((g * g).sum() for g in grads)).item() if grads else None)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2, fused=fused)
    return Module()


def _fit(pl, module, callback, tmp_path, *, steps=4, plugins=(), logger=False):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] ** 2), batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callback if isinstance(callback, list) else [callback],
                         plugins=list(plugins), default_root_dir=tmp_path, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about dataloader workers etc.
        warnings.filterwarnings("always", category=torchhealth.HealthWarning)
        trainer.fit(module, data)
    return trainer


def test_lightning_callback_logs_every_step_through_the_loggers(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torchhealth.integrations.lightning import HealthCheckCallback
    torch.manual_seed(1)
    module = _lightning_module(pl)
    callback = HealthCheckCallback(histogram=True, sinks=[JsonlSink(tmp_path / "run.jsonl")], per_tensor=True)
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    _fit(pl, module, callback, tmp_path, steps=4, logger=logger)
    reports = read_jsonl(tmp_path / "run.jsonl")
    assert [r.step for r in reports] == [0, 1, 2, 3]
    assert {r.name for r in reports[0].rows} == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert all(r.hist for r in reports[0].rows if r.role == "grad")
    # The callback saw the gradients the optimizer used: same norm as the module's own hook.
    assert [r.grad_norm for r in reports] == pytest.approx(module.seen_norms, rel=SUM_RTOL)
    assert [r.scalars for r in reports] == [{"lr": 1e-2}] * 4  # drawn by the HTML report
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]): float(r["health/grad_norm"]) for r in rows if r.get("health/grad_norm")}
    assert logged == pytest.approx({r.step: r.grad_norm for r in reports})
    assert any(r.get("grad_norm/net.0.weight") for r in rows)


def test_lightning_callback_skips_a_nonfinite_step(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torchhealth.integrations.lightning import HealthCheckCallback
    torch.manual_seed(1)
    module = _lightning_module(pl, nan_at=2)
    callback = HealthCheckCallback()  # default policy: skip non-finite steps
    before = {}

    class Snapshot(pl.Callback):  # parameters and Adam state before each step
        def on_train_batch_start(self, trainer, pl_module, batch, i):
            opt = trainer.optimizers[0]
            before[trainer.global_step] = ([p.detach().clone() for p in pl_module.parameters()],
                                           [s["exp_avg"].clone() for s in opt.state.values()])
    with pytest.warns(torchhealth.HealthWarning, match="step 2: nonfinite"):
        _fit(pl, module, [callback, Snapshot()], tmp_path, steps=4)
    assert callback.skipped_steps == 1 and callback.last_report.step == 3
    # Step 2 changed no parameter and no optimizer state; step 1 did.
    for a, b in zip(before[2][0] + before[2][1], before[3][0] + before[3][1]):
        assert torch.equal(a, b)
    assert not torch.equal(before[1][0][0], before[2][0][0])
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("fused", [False, True], ids=["lightning-unscales", "optimizer-unscales"])
def test_lightning_callback_sees_unscaled_gradients_under_amp(tmp_path, fused):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins.precision import MixedPrecision

    from torchhealth.integrations.lightning import HealthCheckCallback
    norms = {}
    for amp in (False, True):
        torch.manual_seed(1)
        module = _lightning_module(pl, fused=fused)
        got = []
        callback = HealthCheckCallback(sinks=[got.append])
        # fp16 autocast with a GradScaler on the CPU (Lightning's flag would pick bf16 there).
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))] \
            if amp else []
        _fit(pl, module, callback, tmp_path, steps=3, plugins=plugins)
        norms[amp] = [r.grad_norm for r in got]
        assert not any(r.findings for r in got)
    # Scaled gradients would be 4096x larger; fp16 autocast changes them only slightly.
    assert norms[True] == pytest.approx(norms[False], rel=0.02)


# -- transformers ------------------------------------------------------------------------------
@pytest.fixture
def hf(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers


def _hf_trainer(transformers, tmp_path, callback, *, nan_at=None, steps=5, n_layer=1, max_grad_norm=0.0,
                **arguments):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2)
    model = transformers.GPT2LMHeadModel(config)  # random weights, nothing downloaded
    ids = torch.randint(0, 64, (40, 8))
    data = [{"input_ids": r, "labels": r} for r in ids]
    calls = [0]

    def inject(module, inputs, output):  # NaN embeddings in the forward of step `nan_at`
        calls[0] += 1
        return output * float("nan") if calls[0] == (nan_at or 0) + 1 and nan_at is not None else output
    model.transformer.wte.register_forward_hook(inject)
    args = transformers.TrainingArguments(**{
        "output_dir": str(tmp_path / "out"), "max_steps": steps, "per_device_train_batch_size": 4,
        "report_to": [], "use_cpu": True, "save_strategy": "no", "logging_strategy": "no",
        "disable_tqdm": True, "learning_rate": 1e-3, "max_grad_norm": max_grad_norm, **arguments})
    return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]), model


def test_hf_callback_checks_every_optimizer_step(hf, tmp_path):
    from torchhealth.integrations.hf import HealthCheckCallback
    callback = HealthCheckCallback(histogram=True, sinks=[JsonlSink(tmp_path / "run.jsonl")])
    trainer, model = _hf_trainer(hf, tmp_path, callback, steps=4)
    grads, rates = [], []

    def spy(self, a, s, c, optimizer=None, **k):
        rates.append(optimizer.param_groups[0]["lr"])
        grads.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()
                                    if p.grad is not None)).item())
    trainer.add_callback(type("Spy", (hf.TrainerCallback,), {"on_pre_optimizer_step": spy})())
    trainer.train()
    reports = read_jsonl(tmp_path / "run.jsonl")
    # Report steps are the Trainer's global_step for each optimizer step (1-based, as it logs them).
    assert [r.step for r in reports] == [1, 2, 3, 4] and trainer.state.global_step == 4
    assert "transformer.h.0.attn.c_attn.weight" in {r.name for r in reports[0].rows}
    assert [r.grad_norm for r in reports] == pytest.approx(grads, rel=SUM_RTOL)
    # the learning rate each step used (the Trainer's linear decay), for the report's curves
    assert [r.scalars["lr"] for r in reports] == rates and rates[0] > rates[-1] > 0
    assert not any(r.findings for r in reports if r.step > 1)


def test_hf_callback_names_the_gradient_a_nan_was_born_in_despite_clipping(hf, tmp_path):
    """A NaN planted in one gradient at step 2, with the Trainer's default clipping
    (max_grad_norm=1.0), which spreads it to every gradient before the optimizer step."""
    from torchhealth.integrations.hf import HealthCheckCallback
    reports = []
    callback = HealthCheckCallback(sinks=[reports.append])
    trainer, model = _hf_trainer(hf, tmp_path, callback, steps=4, n_layer=2, max_grad_norm=1.0)
    target = model.transformer.h[1].mlp.c_fc.weight
    calls = [0]

    def plant(grad):
        calls[0] += 1
        return grad * float("nan") if calls[0] == 3 else grad
    target.register_hook(plant)
    seen = []  # before the health callback (which drops the gradients of a skipped step)
    trainer.callback_handler.callbacks.insert(0, type("Spy", (hf.TrainerCallback,), {
        "on_pre_optimizer_step": lambda self, a, s, c, **k: seen.append(
            sum(bool(torch.isnan(p.grad).any()) for p in model.parameters() if p.grad is not None))})())
    with pytest.warns(torchhealth.HealthWarning, match="nonfinite"):
        trainer.train()
    assert seen[2] == len([p for p in model.parameters() if p.requires_grad])  # clipping spread it
    (f,) = [f for f in reports[2].findings if f.check == "nonfinite"]
    assert f.names == ["transformer.h.1.mlp.c_fc.weight"] and reports[2].skipped and reports[2].step == 3
    assert not any(r.findings for r in reports if r.step != 3)


def test_hf_callback_can_raise_out_of_train(hf, tmp_path):
    from torchhealth.integrations.hf import HealthCheckCallback
    callback = HealthCheckCallback(policy={"nonfinite": "raise"}, stop_on_raise=False)
    trainer, _ = _hf_trainer(hf, tmp_path, callback, nan_at=1, steps=4)
    with pytest.raises(torchhealth.HealthCheckError, match="step 2 failed"):
        trainer.train()


def test_integrations_say_how_to_install(monkeypatch):
    for module, extra in (("lightning", "lightning"), ("transformers", "hf")):
        monkeypatch.setitem(sys.modules, module, None)
        monkeypatch.setitem(sys.modules, f"{module}.pytorch", None)
        name = "torchhealth.integrations." + ("lightning" if extra == "lightning" else "hf")
        monkeypatch.delitem(sys.modules, name, raising=False)
        with pytest.raises(ImportError, match=rf"pip install torchhealth\[{extra}\]"):
            __import__(name)


def test_core_imports_no_optional_package():
    code = ("import sys, torchhealth, torchhealth.sinks, torchhealth.cli, torchhealth.html_report\n"
            "bad = [m for m in ('lightning', 'transformers', 'wandb', 'tensorboard', 'matplotlib') if m in sys.modules]\n"
            "assert not bad, bad\n")
    import subprocess
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_skip_aware_scheduler_under_accelerate(monkeypatch):
    """accelerate's prepared scheduler and optimizer: a skipped step does not move
    the learning rate (AcceleratedScheduler has `optimizers`, not `optimizer`)."""
    accelerate = pytest.importorskip("accelerate")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    accelerator = accelerate.Accelerator(cpu=True)
    model, aopt, asched = accelerator.prepare(model, opt, sched)
    sched = torchhealth.SkipAwareScheduler(asched)
    lrs = []
    for step in range(3):
        x = torch.randn(8, 4)
        if step == 1:
            x[0, 0] = float("nan")
        aopt.zero_grad()
        with pytest.warns(torchhealth.HealthWarning) if step == 1 else contextlib.nullcontext():
            accelerator.backward(model(x).pow(2).mean())
            aopt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.5, 0.5, 0.25] and opt.skipped_steps == 1
    with pytest.raises(TypeError, match="steps no HealthCheckedOptimizer"):
        torchhealth.SkipAwareScheduler(torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters()), 1))


def test_lightning_several_optimizers_each_checked_on_its_cadence_with_its_own_keys(tmp_path):
    """Manual optimization with two optimizers (a GAN's shape), check_every=2: the
    trainer's global_step advances once per optimizer step, so a shared counter
    would never check one of them; metric keys must not collide."""
    pl = pytest.importorskip("lightning.pytorch")
    from torchhealth.integrations.lightning import HealthCheckCallback

    class TwoOptimizers(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.a, self.b = torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)

        def training_step(self, batch, i):
            x, y = batch
            for net, opt in zip((self.a, self.b), self.optimizers()):
                opt.zero_grad()
                self.manual_backward(torch.nn.functional.mse_loss(net(x), y))
                opt.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.01)

    torch.manual_seed(0)
    reports = []
    callback = HealthCheckCallback(check_every=2, sinks=[reports.append])
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    _fit(pl, TwoOptimizers(), callback, tmp_path, steps=8, logger=logger)
    names = [{r.name for r in rep.rows} for rep in reports]
    assert sum(n == {"a.weight", "a.bias"} for n in names) == 2  # 4 steps of each optimizer: 0 and 2
    assert sum(n == {"b.weight", "b.bias"} for n in names) == 2
    with open(logger.experiment.metrics_file_path) as f:
        header = next(csv.reader(f))
    assert "optimizer0/health/grad_norm" in header and "optimizer1/health/grad_norm" in header
    state = callback.state_dict()
    assert sorted(state["optimizers"]) == [0, 1] and state["optimizers"][1]["steps"] == 4
    assert state["optimizers"][0]["monitor"]["checks"] == 2


def test_lightning_callback_state_survives_a_checkpoint(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torchhealth.integrations.lightning import HealthCheckCallback
    torch.manual_seed(1)
    callback = HealthCheckCallback()
    trainer = _fit(pl, _lightning_module(pl), callback, tmp_path, steps=3)
    trainer.save_checkpoint(tmp_path / "ckpt.ckpt")
    (monitor,) = callback.monitors.values()
    running = monitor.state_dict()["running"]
    resumed = HealthCheckCallback()
    ckpt = torch.load(tmp_path / "ckpt.ckpt", weights_only=False)
    (saved,) = [v for k, v in ckpt["callbacks"].items() if "HealthCheckCallback" in k]
    resumed.load_state_dict(saved)
    module = _lightning_module(pl)
    _fit(pl, module, resumed, tmp_path, steps=1)  # a fresh trainer: the monitor is made, then restored
    (again,) = resumed.monitors.values()
    assert again.checks == 3 + 1 and int(again.state_dict()["running"]["count"]) == int(running["count"]) + 1


def test_integrations_log_each_groups_learning_rate_when_they_differ():
    from torchhealth.integrations._common import log_learning_rates
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    for groups, want in (([{"params": a.parameters()}, {"params": b.parameters(), "lr": 0.5}],
                          {"lr/group0": 0.1, "lr/group1": 0.5}),
                         ([{"params": a.parameters()}, {"params": b.parameters()}], {"lr": 0.1})):
        opt = torch.optim.SGD(groups, lr=0.1)
        monitor = torchhealth.HealthMonitor(opt)
        log_learning_rates(monitor, opt)
        for p in opt.param_groups[0]["params"] + opt.param_groups[1]["params"]:
            p.grad = torch.ones_like(p)
        monitor.check(0)
        assert monitor.last_report.scalars == want
