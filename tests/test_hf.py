"""The transformers Trainer callback: metrics in report_to, a failing train() under
"raise", and its running state across checkpoints (the real Trainer, offline)."""
import glob
import os

import pytest
import torch

import torchhealth
from torchhealth.sinks import JsonlSink, read_jsonl

from test_integrations import _hf_trainer, hf  # noqa: F401 (hf is a fixture)


def _plant_nan(model, name: str, at_backward: int):
    """NaN in the gradient of parameter `name` in backward pass `at_backward` (1-based)."""
    param = dict(model.named_parameters())[name]
    calls = [0]

    def plant(grad):
        calls[0] += 1
        return grad * float("nan") if calls[0] == at_backward else grad
    param.register_hook(plant)


def test_hf_health_scalars_reach_the_trainers_tensorboard(hf, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from torchhealth.integrations.hf import HealthCheckCallback
    reports = []
    callback = HealthCheckCallback(sinks=[reports.append])
    trainer, _ = _hf_trainer(hf, tmp_path, callback, steps=3, report_to=["tensorboard"],
                             logging_strategy="steps", logging_steps=1)
    # report_to callbacks are registered before user callbacks: they run first.
    logged_keys = []
    trainer.add_callback(type("Spy", (hf.TrainerCallback,), {
        "on_log": lambda self, a, s, c, logs=None, **k: logged_keys.append(set(logs))})())
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("TensorBoardCallback") < names.index("HealthCheckCallback")
    trainer.train()
    (events,) = glob.glob(str(tmp_path / "out" / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(os.path.dirname(events))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags
    for key in ("grad_norm", "finite_grad_norm", "param_norm", "nonfinite", "findings", "skipped"):
        assert f"train/health/{key}" in tags
    logged = acc.Scalars("train/health/grad_norm")
    # At the Trainer's global_step, one value per logging step, the Report of that step.
    assert [e.step for e in logged] == [1, 2, 3] == [r.step for r in reports]
    assert [e.value for e in logged] == pytest.approx([r.grad_norm for r in reports], rel=1e-6)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert trainer.callback_handler.callbacks.count(callback) == 1

    assert all("health/grad_norm" in keys for keys in logged_keys[:3])  # callbacks after it see them
    logged_keys.clear()
    trainer.args.max_steps = 1
    trainer.train()  # a second run counts its steps from 1 again
    assert "health/grad_norm" in logged_keys[0]
    logged_keys.clear()
    trainer.remove_callback(callback)  # its metrics stop with it
    trainer.train()
    assert logged_keys and not any("health/grad_norm" in keys for keys in logged_keys)


def test_hf_train_raises_the_health_error_after_stopping_cleanly(hf, tmp_path):  # noqa: F811
    from torchhealth.integrations.hf import HealthCheckCallback
    callback = HealthCheckCallback(policy={"nonfinite": "raise"}, sinks=[JsonlSink(tmp_path / "run.jsonl")])
    ended = []
    after = type("After", (hf.TrainerCallback,), {"on_train_end": lambda self, *a, **k: ended.append(True)})()
    trainer, model = _hf_trainer(hf, tmp_path, callback, steps=6)
    trainer.add_callback(after)  # after the health callback: still ends before train() raises
    _plant_nan(model, "transformer.h.0.mlp.c_fc.weight", at_backward=3)
    with pytest.raises(torchhealth.HealthCheckError, match=r"(?s)step 3.*transformer\.h\.0\.mlp\.c_fc\.weight") as e:
        trainer.train()
    assert e.value is callback.error and callback.error.report.step == 3
    assert trainer.state.global_step == 3  # steps 1, 2, 3; nothing after the fault
    assert callback.skipped_steps == 1 and ended == [True]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was not taken
    assert [r.step for r in read_jsonl(tmp_path / "run.jsonl")] == [1, 2, 3]  # sink closed, complete


def test_hf_train_succeeds_without_a_fault_under_raise(hf, tmp_path):  # noqa: F811
    from torchhealth.integrations.hf import HealthCheckCallback
    callback = HealthCheckCallback(policy="raise", thresholds=torchhealth.Thresholds(min_norm=0.0))
    trainer, _ = _hf_trainer(hf, tmp_path, callback, steps=2)
    assert trainer.train().global_step == 2 and callback.error is None


def _baselines(callback):
    state = callback.monitor.state_dict()
    return state["checks"], state["running"]


def test_hf_callback_state_survives_a_checkpoint_and_resume(hf, tmp_path):  # noqa: F811
    from torchhealth.integrations.hf import HealthCheckCallback
    settings = {"steps": 5, "save_strategy": "steps", "save_steps": 3}
    whole = HealthCheckCallback()
    trainer, _ = _hf_trainer(hf, tmp_path / "a", whole, **settings)
    trainer.train()
    assert (tmp_path / "a" / "out" / "checkpoint-3" / "trainer_state.json").exists()

    resumed = HealthCheckCallback()
    trainer, _ = _hf_trainer(hf, tmp_path / "b", resumed, **settings)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))
    assert trainer.callback_handler.callbacks.count(resumed) == 1  # the user's own object, restored
    checks, running = _baselines(resumed)
    whole_checks, whole_running = _baselines(whole)
    assert checks == whole_checks == 5 and int(running["count"]) == int(whole_running["count"]) == 5
    for key, value in whole_running.items():  # the same baseline as the uninterrupted run
        assert torch.allclose(running[key].double(), value.double(), rtol=1e-9, atol=0), key

    fresh = HealthCheckCallback()  # no resume: a new baseline
    trainer, _ = _hf_trainer(hf, tmp_path / "c", fresh, steps=2)
    trainer.train()
    assert _baselines(fresh)[0] == 2
