"""Model sanity checks as tests: `check_model` runs the suite on a deepcopy of
a model with one batch and returns a `SanityReport`; `assert_model_ok` and the
``assert_*`` functions raise an `AssertionError` listing every failure.
`check_batch`, `check_loader` and `check_transforms` check the data;
`torchhealth.testing.data` makes small synthetic data sets with a known answer.
"""
from . import data
from .data_checks import check_batch, check_loader, check_transforms
from .report import CheckResult, SanityReport, Status
from .suite import (CHECK_NAMES, assert_all_connected, assert_batch_independent, assert_eval_mode,
                    assert_finite, assert_frozen, assert_init_loss, assert_logits,
                    assert_model_ok, assert_nonlinear, assert_output_range,
                    assert_overfits_batch, assert_params_update, check_model)

__all__ = [
    "CHECK_NAMES", "CheckResult", "SanityReport", "Status", "assert_all_connected",
    "assert_batch_independent", "assert_eval_mode", "assert_finite", "assert_frozen",
    "assert_init_loss", "assert_logits", "assert_model_ok", "assert_nonlinear",
    "assert_output_range", "assert_overfits_batch", "assert_params_update", "check_batch",
    "check_loader", "check_model", "check_transforms", "data",
]
