"""Callbacks for training frameworks, each an optional extra:

- `torchhealth.integrations.lightning.HealthCheckCallback` (``pip install torchhealth[lightning]``)
- `torchhealth.integrations.hf.HealthCheckCallback` (``pip install torchhealth[hf]``)

Both run the checks through `torchhealth.HealthMonitor`, as `HealthCheckedOptimizer` does.
Import the submodule you need; this package imports neither framework.
"""
