"""`check_model`, `assert_model_ok` and one assertion per check.

The suite works on a deepcopy of the model (and of the optimizer): the user's
model, gradients, optimizer state and global RNG are left as they were. It
runs one train-mode forward and backward (with forward hooks on the leaf
modules to read the activations), one optimizer step, one eval-mode forward
and backward for batch independence, and the steps of the overfit check.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .batch import UserCodeError, as_batch, trainable_parameters
from .data_checks import check_batch
from .model_checks import MODEL_CHECKS, Options
from .probe import OptimizerArg, Probe, resolve_names
from .report import SanityReport, failed, not_applicable
from .rng import seeded

DATA_CHECKS = {"inputs_finite", "input_range", "layout", "labels", "constant_features"}
CHECK_NAMES = tuple(sorted(DATA_CHECKS)) + tuple(MODEL_CHECKS)


def check_model(model: nn.Module, batch: Any, loss_fn: Callable, *,
                optimizer: OptimizerArg = None, frozen: Iterable = (),
                output_range: tuple[float, float] | None = None, classes: int | None = None,
                expected_init_loss: float | None = None, init_loss_rtol: float = 0.5,
                output_kind: str | None = None, evaluate: Callable | None = None,
                overfit_steps: int = 200, overfit_ratio: float = 0.1,
                expect_range: tuple[float, float] | None = None, layout: str | None = "NCHW",
                checks: Iterable[str] | None = None, skip: Iterable[str] = (),
                target_key: str = "labels", seed: int = 0) -> SanityReport:
    """Run the sanity suite on ``model`` with one ``batch`` and ``loss_fn``.

    Checks (select with ``checks=``, leave out with ``skip=``): the data checks
    of `check_batch` on the batch, then finite (no NaN/Inf in loss,
    activations, parameters, gradients), connected (every trainable parameter
    gets a nonzero gradient), params_update (every parameter not in
    ``frozen`` changes in one optimizer step), frozen (those in ``frozen``
    do not), output_range, logits (CrossEntropyLoss gets logits, NLLLoss
    log-probabilities), init_loss (about log(classes) or
    ``expected_init_loss``, within ``init_loss_rtol``), nonlinearity (no
    linear layer feeds another directly), batch_independent (eval mode, so
    batch norm is no false alarm), eval_mode (``evaluate(model, batch)``, the
    validation function, runs dropout and batch norm in eval mode), overfits
    (the loss drops below ``overfit_ratio`` x its start within
    ``overfit_steps`` steps on the batch).

    Steps use ``optimizer`` (an optimizer over the model's parameters, copied
    with the model; or a function from parameters to an optimizer; default
    Adam lr=1e-2) on a deepcopy: the model passed in is never modified.
    ``frozen``: parameter or module names, modules or parameters.

    Bad input raises: ``TypeError`` for a batch that is not a tensor or a
    tuple/list/dict of tensors, a loss that is not a tensor; ``ValueError``
    for a loss that is not a scalar, a model without trainable parameters.
    When the model or loss raises, the report says so in a failed "forward"
    check and the model checks are not applicable.
    """
    trainable_parameters(model)  # a clear error for a non-module or nothing to train
    b = as_batch(batch, target_key=target_key)
    selected = _select(checks, skip)
    opts = Options(frozen=resolve_names(model, frozen, "frozen"), output_range=output_range,
                   classes=classes, expected_init_loss=expected_init_loss,
                   init_loss_rtol=init_loss_rtol, output_kind=output_kind, evaluate=evaluate,
                   raw_batch=batch, overfit_steps=overfit_steps, overfit_ratio=overfit_ratio)
    results = []
    if selected & DATA_CHECKS:
        results = [r for r in check_batch(b, expect_range=expect_range, layout=layout,
                                          classes=classes) if r.name in selected]
    with seeded(seed, {p.device for p in model.parameters()}):
        probe = Probe(model, b, loss_fn, optimizer, seed)
        try:
            probe.train_pass  # noqa: B018  (every model check needs it)
        except UserCodeError as e:
            results.append(failed("forward", f"{e}", ["model" if "model" in str(e) else "loss_fn"]))
            results += [not_applicable(n, "the forward pass or the loss raised")
                        for n in MODEL_CHECKS if n in selected]
            return SanityReport(tuple(results), type(model).__name__)
        results += [MODEL_CHECKS[n](probe, opts) for n in MODEL_CHECKS if n in selected]
    return SanityReport(tuple(results), type(model).__name__)


def _select(checks, skip) -> set[str]:
    known = set(CHECK_NAMES)
    chosen = set(known if checks is None else checks)
    unknown = (chosen | set(skip)) - known
    if unknown:
        raise ValueError(f"unknown check name(s) {sorted(unknown)}; the checks are "
                         f"{sorted(known)}")
    return chosen - set(skip)


def assert_model_ok(model: nn.Module, batch: Any, loss_fn: Callable, **kwargs) -> SanityReport:
    """`check_model`, raising an `AssertionError` that lists every failed check."""
    return check_model(model, batch, loss_fn, **kwargs).raise_if_failed()


def _single(name: str, doc: str):
    def assertion(model: nn.Module, batch: Any, loss_fn: Callable, **kwargs) -> SanityReport:
        return check_model(model, batch, loss_fn, checks=(name,), **kwargs).raise_if_failed()

    assertion.__name__ = assertion.__qualname__ = f"assert_{name}"
    assertion.__doc__ = (f"Assert that {doc}. Runs `check_model` with only the "
                         f"{name!r} check (same keyword arguments); returns its report.")
    return assertion


assert_params_update = _single("params_update", "every parameter not listed in frozen= changes "
                               "in one optimizer step (on a deepcopy of the model)")
assert_frozen = _single("frozen", "the parameters listed in frozen= do not change in one "
                        "optimizer step (on a deepcopy of the model)")
assert_all_connected = _single("connected", "every trainable parameter gets a nonzero gradient")
assert_finite = _single("finite", "the loss, activations, parameters and gradients hold no NaN/Inf")
assert_output_range = _single("output_range", "the output lies in output_range=")
assert_batch_independent = _single(
    "batch_independent", "the output of one sample depends on that sample's input only "
    "(one backward through a masked output, in eval mode so that batch norm is no false alarm)")
assert_init_loss = _single("init_loss", "the loss at initialisation is about log(classes) "
                           "(or expected_init_loss=) within init_loss_rtol")
assert_overfits_batch = _single("overfits", "the model overfits the batch: the loss falls below "
                                "overfit_ratio x its start within overfit_steps steps (on a "
                                "deepcopy of the model)")
assert_logits = _single("logits", "the output is what the loss expects (logits for "
                        "CrossEntropyLoss: no softmax applied twice)")
assert_nonlinear = _single("nonlinearity", "no linear layer feeds another without an activation")
assert_eval_mode = _single("eval_mode", "evaluate= runs dropout and batch norm in eval mode")
