"""Optional dependencies, imported only when a feature needs them."""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"torchhealth: this feature needs {module.split('.')[0]}, which is not "
                          f"installed ({e}); install it with `pip install torchhealth[{extra}]`") from e
