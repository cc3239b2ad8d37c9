"""The host boundary: one packed device-to-host copy of a check's named results.

Everything before it stays on the device. `HostCopy` packs named tensors
(int64, float64 by bit pattern, bool) into one int64 buffer, starts one copy
(non-blocking into pinned memory on CUDA, with one event), and unpacks by
field name, so no reader computes offsets. On the CPU there is nothing to copy:
the fields are kept as they are and read by the same names. `read` is the only
place that waits for the device; `tensor` and `value` unpack what it brought
back, field by field.
"""
from __future__ import annotations

from typing import Any

import torch

_KINDS = (torch.int64, torch.float64, torch.bool)


class HostCopy:
    """One copy to the host of ``fields`` (name -> tensor, all on one device)."""

    def __init__(self, fields: dict[str, torch.Tensor]):
        self._spec: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self._host: dict[str, torch.Tensor] = {}
        self._values: dict[str, Any] = {}
        self._event, self._landed = None, False
        for name, t in fields.items():
            if t.dtype not in _KINDS:
                raise TypeError(f"HostCopy: field {name!r} has dtype {t.dtype}; it packs {_KINDS}")
        if all(t.is_cpu for t in fields.values()):
            # The host is the device: nothing to copy, and packing would cost
            # more small ops than the check's own. The fields are read as they
            # are: the check's own tensors, made without autograd and never
            # changed after it (the user's scalars are detached copies made
            # when logged, `torchhealth.user_scalars.checked`).
            self._names, self._buffer, self._fields = tuple(fields), None, fields
            return
        parts, at = [], 0
        for name, t in fields.items():
            flat = t.reshape(-1)
            flat = flat.view(torch.int64) if t.dtype == torch.float64 else flat.to(torch.int64)
            self._spec[name] = (t.dtype, tuple(t.shape), at, at + flat.numel())
            parts.append(flat)
            at += flat.numel()
        self._names = tuple(self._spec)
        packed = torch.cat(parts)
        if packed.device.type == "cuda":
            self._buffer = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._buffer.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # other accelerators: a plain (blocking) copy
            self._buffer = packed.cpu()

    @property
    def fields(self) -> tuple[str, ...]:
        return self._names

    @property
    def ready(self) -> bool:
        """Whether the copy has landed (reading it would not block)."""
        return self._event is None or self._event.query()

    def read(self) -> None:
        """Waits for the copy to land (the first time only: the one place that waits)."""
        if not self._landed:
            if self._event is not None:
                self._event.synchronize()
            self._landed = True

    def tensor(self, name: str) -> torch.Tensor:
        """One field as a host tensor (unpacked on first use: most checks read
        a few flags only)."""
        t = self._host.get(name)
        if t is None:
            self.read()
            if self._buffer is None:  # on the CPU: the field itself
                t = self._host[name] = self._fields[name]
                return t
            dtype, shape, lo, hi = self._spec[name]
            flat = self._buffer[lo:hi]
            flat = flat.view(torch.float64) if dtype == torch.float64 else flat.to(dtype)
            t = self._host[name] = flat.view(shape)
        return t

    def value(self, name: str) -> Any:
        """A field as Python values (a scalar for a 0-d field, else a list)."""
        if name not in self._values:
            self._values[name] = self.tensor(name).tolist()
        return self._values[name]
