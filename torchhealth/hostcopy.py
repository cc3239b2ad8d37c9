"""The host boundary: one packed device-to-host copy of a check's named results.

Everything before it stays on the device. `HostCopy` packs named tensors
(int64, float64 by bit pattern, bool) into one int64 buffer, starts one copy
(non-blocking into pinned memory on CUDA, with one event), and unpacks by
field name, so no reader computes offsets. `read` is the only place that waits
for the device; `value` and `tensor` only look at what `read` brought back.
"""
from __future__ import annotations

from typing import Any

import torch

_KINDS = (torch.int64, torch.float64, torch.bool)


class HostCopy:
    """One copy to the host of ``fields`` (name -> tensor, all on one device)."""

    def __init__(self, fields: dict[str, torch.Tensor]):
        self._spec: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        parts, at = [], 0
        for name, t in fields.items():
            if t.dtype not in _KINDS:
                raise TypeError(f"HostCopy: field {name!r} has dtype {t.dtype}; it packs {_KINDS}")
            flat = t.reshape(-1)
            flat = flat.view(torch.int64) if t.dtype == torch.float64 else flat.to(torch.int64)
            self._spec[name] = (t.dtype, tuple(t.shape), at, at + flat.numel())
            parts.append(flat)
            at += flat.numel()
        packed = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        self._event = None
        if packed.device.type == "cuda":
            self._buffer = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._buffer.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif packed.device.type == "cpu":
            self._buffer = packed
        else:  # other accelerators: a plain (blocking) copy
            self._buffer = packed.cpu()
        self._host: dict[str, torch.Tensor] | None = None
        self._values: dict[str, Any] = {}

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._spec)

    @property
    def ready(self) -> bool:
        """Whether the copy has landed (reading it would not block)."""
        return self._event is None or self._event.query()

    def read(self) -> dict[str, torch.Tensor]:
        """The fields as host tensors (waits for the copy the first time)."""
        if self._host is None:
            if self._event is not None:
                self._event.synchronize()
            host = {}
            for name, (dtype, shape, lo, hi) in self._spec.items():
                flat = self._buffer[lo:hi]
                flat = flat.view(torch.float64) if dtype == torch.float64 else flat.to(dtype)
                host[name] = flat.view(shape)
            self._host = host
        return self._host

    def tensor(self, name: str) -> torch.Tensor:
        return self.read()[name]

    def value(self, name: str) -> Any:
        """A field as Python values (a scalar for a 0-d field, else a list)."""
        if name not in self._values:
            self._values[name] = self.read()[name].tolist()
        return self._values[name]
