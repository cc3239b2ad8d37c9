"""The data the health checks read and return: `Thresholds` (every limit),
`Layout` (what each statistics row is), `Signal` (one check's verdict on the
device) and `RunningState` (what the checks keep on the device between steps).
The checks themselves, and what each default means, are in `torchhealth.checks`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ._args import number, positive_int

CHECKS = ("nonfinite", "exploding", "vanishing", "headroom", "dead")
SEVERITY = {"nonfinite": "error", "exploding": "error", "vanishing": "warning",
            "headroom": "warning", "dead": "warning"}
INFO_KINDS = ("structural", "unreached")
# Formats whose range a training run can exhaust: the headroom check watches them.
_LOWP = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Thresholds:
    """Every threshold of every check. Defaults are in the module docstring;
    set a limit to ``math.inf`` (or ``0`` for lower limits) to disable it."""

    max_norm: float = 1e4
    max_param_norm: float = 1e4
    spike_factor: float = 10.0
    spike_zscore: float = 4.0
    spike_decay: float = 0.95  # EMA decay of the baseline, after warm-up
    warmup: int = 10
    min_norm: float = 1e-8
    min_relative_rms: float = 1e-6
    max_zero_fraction: float = 0.99
    headroom: float = 0.5
    overflow_horizon: float = 20.0
    max_subnormal_fraction: float = 0.01
    dead_after: int = 3
    relative_rms_tensors: int = 100
    structural_rms: float = 1e-2
    # Activations (`torchhealth.watch`): sigmoid/tanh outputs near an asymptote,
    # and ReLU outputs exactly zero, as fractions of a module's output.
    max_saturated_fraction: float = 0.5
    max_dead_fraction: float = 0.95

    def __post_init__(self):
        # Upper limits must be positive (math.inf disables them); lower limits and
        # fractions may be 0 (which disables them).
        ranges = {"max_norm": {}, "max_param_norm": {}, "spike_factor": {"low": 1.0},
                  "spike_zscore": {}, "spike_decay": {"high": 1.0, "high_open": True},
                  "min_norm": {"low_open": False}, "min_relative_rms": {"low_open": False},
                  "max_zero_fraction": {"low_open": False, "high": 1.0},
                  "headroom": {"high": 1.0}, "overflow_horizon": {"low_open": False},
                  "max_subnormal_fraction": {"low_open": False, "high": 1.0},
                  "structural_rms": {"low_open": False, "high": 1.0},
                  "max_saturated_fraction": {"low_open": False, "high": 1.0},
                  "max_dead_fraction": {"low_open": False, "high": 1.0}}
        for name, bounds in ranges.items():
            object.__setattr__(self, name, number(f"Thresholds.{name}", getattr(self, name), **bounds))
        for name in ("warmup", "dead_after", "relative_rms_tensors"):
            object.__setattr__(self, name, positive_int(f"Thresholds.{name}", getattr(self, name)))


@dataclass
class Layout:
    """What each statistics row describes (its tensor's name, role, dtype and
    shape), on the host, plus the parameters the rows belong to.

    ``roles[i]`` is "param", "grad" or "state.<key>"; ``param_index[i]`` is the
    parameter row ``i`` belongs to. ``trainable[j]``/``param_names[j]`` describe
    parameter ``j`` (dead-parameter counters are per parameter, since a None
    gradient has no row). ``sparse[j]`` marks a parameter whose gradient is
    mostly zero by design (an embedding table, a sparse gradient): the
    zero-fraction part of the vanishing check skips it. ``structural[j]`` is
    why parameter ``j``'s gradient is zero by construction ("" when nothing in
    the model's structure says so; see `structural`) and ``modules[j]`` the
    module that owns it: the collector fills both from the model. Parameters
    of one module share its output gradient; a parameter whose module is not
    known (None, or no ``modules``) is a module of its own.
    """

    names: list[str]
    roles: list[str]
    dtypes: list[torch.dtype]
    shapes: list[tuple[int, ...]] = None
    param_index: list[int] = None
    param_names: list[str] = None
    trainable: list[bool] = None
    sparse: list[bool] = None
    structural: list[str] = None
    modules: list[str | None] = None
    # `masks` per device; the CPU op's arguments per Thresholds (checks.py).
    _device_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        n = len(self.names)
        if self.shapes is None:
            self.shapes = [()] * n
        if self.param_index is None:  # one parameter per distinct name
            order = list(dict.fromkeys(self.names))
            self.param_index = [order.index(x) for x in self.names]
            self.param_names = self.param_names or order
        if self.param_names is None:
            raise ValueError("Layout: param_names is required with param_index")
        if self.trainable is None:
            self.trainable = [True] * len(self.param_names)
        if self.sparse is None:
            self.sparse = [False] * len(self.param_names)
        if self.structural is None:
            self.structural = [""] * len(self.param_names)
        if self.modules is None:
            self.modules = [None] * len(self.param_names)
        keys = [m if m is not None else ("param", j) for j, m in enumerate(self.modules)]
        order = {m: k for k, m in enumerate(dict.fromkeys(keys))}
        self.module_index = [order[m] for m in keys]
        self.num_modules = len(order)
        self.num_grads = sum(r == "grad" for r in self.roles)
        # What no check of this layout can find (checks return constant signals).
        self.has_state = any(r.startswith("state") for r in self.roles)
        self.has_lowp = any(d in _LOWP for d in self.dtypes)

    def __len__(self) -> int:
        return len(self.names)

    def masks(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-row and per-parameter constants on `device`, made once."""
        cached = self._device_cache.get(device)
        if cached is None:
            grad = [r == "grad" for r in self.roles]
            grad_row = {self.param_index[i]: i for i, g in enumerate(grad) if g}
            has_grad = [j in grad_row for j in range(len(self.param_names))]
            dmax = [torch.finfo(d).max for d in self.dtypes]
            cached = {
                "grad": torch.tensor(grad, dtype=torch.bool),
                "param": torch.tensor([r == "param" for r in self.roles], dtype=torch.bool),
                "state": torch.tensor([r.startswith("state") for r in self.roles], dtype=torch.bool),
                "lowp": torch.tensor([d in _LOWP for d in self.dtypes], dtype=torch.bool),
                "dtype_max": torch.tensor(dmax, dtype=torch.float64),
                # Per parameter: the row of its gradient, or one past the last row
                # (a row the callers append) when it has none.
                "param_grad": torch.tensor([grad_row.get(j, len(self.roles))
                                            for j in range(len(self.param_names))], dtype=torch.int64),
                "param_rows": torch.tensor([i for i, r in enumerate(self.roles) if r == "param"],
                                           dtype=torch.int64),
                "trainable": torch.tensor(self.trainable, dtype=torch.bool),
                "missing": torch.tensor([t and not h for t, h in zip(self.trainable, has_grad)], dtype=torch.bool),
                "others_learn": torch.tensor(any(t and h for t, h in zip(self.trainable, has_grad))),
                "dense": torch.tensor([not self.sparse[j] for j in self.param_index], dtype=torch.bool),
                "row_param": torch.tensor(self.param_index, dtype=torch.int64),
                "module": torch.tensor([self.module_index[j] for j in self.param_index], dtype=torch.int64),
                "candidate": torch.tensor([bool(self.structural[j]) for j in self.param_index],
                                          dtype=torch.bool),
                "eps": torch.tensor([torch.finfo(d).eps for d in self.dtypes], dtype=torch.float64),
                "tiny": torch.tensor([torch.finfo(d).tiny for d in self.dtypes], dtype=torch.float64),
                # Constants of signals that cannot fire (never changed in place).
                "no_rows": torch.zeros(len(self.roles), dtype=torch.bool),
                "false": torch.zeros((), dtype=torch.bool),
                "false1": torch.zeros(1, dtype=torch.bool),
                "true1": torch.ones(1, dtype=torch.bool),
                "zero": torch.zeros((), dtype=torch.float64),
                "inf": torch.full((), math.inf, dtype=torch.float64),
                "ninf": torch.full((), -math.inf, dtype=torch.float64),
            }
            cached.update(_native_constants(cached))
            cached = {k: v.to(device) for k, v in cached.items()}
            self._device_cache[device] = cached
        return cached


def _native_constants(m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`Layout.masks`' rows and parameters packed as the CPU op
    ``torchhealth::run_checks`` takes them (csrc/cpu/checks_cpu.cpp): per row
    its flags (bits 0-5: gradient, parameter, optimizer state, low precision,
    dense, structural candidate), parameter and module; its dtype's max, eps
    and smallest normal; per parameter its gradient row (or one past the last)
    and flags (bit 0 trainable, bit 1 missing: trainable without a gradient)."""
    flags = sum(m[k].long() << bit for bit, k in enumerate(("grad", "param", "state", "lowp", "dense", "candidate")))
    return {"row_ints": torch.stack([flags, m["row_param"], m["module"]], 1),
            "row_floats": torch.stack([m["dtype_max"], m["eps"], m["tiny"]], 1),
            "param_ints": torch.stack([m["param_grad"], m["trainable"].long() | (m["missing"].long() << 1)], 1)}


class Signal:
    """One check's verdict on the device. ``mask`` is over statistics rows
    (``axis="rows"``) or parameters (``axis="params"``).

    An info signal (a kind in `INFO_KINDS`) records a fact, never an alarm: its
    ``fired`` is always False, so no policy acts on it (no skip, no
    escalation), and its ``mask`` says what to record (`finding`).

    ``fired`` (bool []), ``mask`` (bool [rows] or [params]) and ``value``
    (float64 []: the measured value, the worst one) are tensors. A signal of
    `SignalList.packed` makes them, as views of the list's tensors, only when
    read: a check's consumers read the list's tensors whole."""

    __slots__ = ("check", "kind", "threshold", "axis", "_fired", "_mask", "_value", "_at")

    def __init__(self, check: str, kind: str, fired: torch.Tensor | None, mask: torch.Tensor | None,
                 value: torch.Tensor | None, threshold: float, axis: str = "rows"):
        self.check, self.kind, self.threshold, self.axis = check, kind, threshold, axis
        self._fired, self._mask, self._value = fired, mask, value
        self._at = None  # ((fired, value, mask), index, mask offset, mask size) of a packed signal

    def _view(self, name: str) -> torch.Tensor:
        (fired, value, mask), i, start, size = self._at
        self._fired, self._value, self._mask = fired[i], value[i], mask[start:start + size]
        return getattr(self, name)

    fired = property(lambda self: self._fired if self._fired is not None else self._view("_fired"))
    mask = property(lambda self: self._mask if self._mask is not None else self._view("_mask"))
    value = property(lambda self: self._value if self._value is not None else self._view("_value"))

    @property
    def size(self) -> int:
        """The length of ``mask``."""
        return self._at[3] if self._mask is None else self._mask.numel()

    @property
    def severity(self) -> str:
        return "info" if self.kind in INFO_KINDS else SEVERITY[self.check]

    def __repr__(self) -> str:
        return f"Signal({self.check}/{self.kind}, threshold={self.threshold}, axis={self.axis})"


class SignalList(list):
    """The signals of one check, in order, and (`stacked`) their ``fired``,
    ``value`` and concatenated ``mask`` tensors: what the policy and the host
    copy read (made once; `packed` is given them)."""

    _stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def packed(meta: list[tuple[str, str, str, float, int]], fired: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor) -> SignalList:
        """Signals ``(check, kind, axis, threshold, mask size)`` whose tensors
        are rows of ``fired`` [S], ``value`` [S] and slices of ``mask``."""
        out = SignalList()
        out._stacked = (fired, value, mask)
        at = 0
        for i, (check, kind, axis, threshold, size) in enumerate(meta):
            s = Signal(check, kind, None, None, None, threshold, axis)
            s._at = (out._stacked, i, at, size)
            at += size
            out.append(s)
        return out

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._stacked is None:
            self._stacked = (torch.stack([s.fired for s in self]), torch.stack([s.value for s in self]),
                             torch.cat([s.mask for s in self]))
        return self._stacked


def stacked(signals: list[Signal]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fired`` [S], ``value`` [S] and the concatenated masks of ``signals``."""
    return (signals if isinstance(signals, SignalList) else SignalList(signals)).stacked()


@dataclass
class RunningState:
    """State kept on the device between checks: the gradient-norm baseline
    (count, mean and variance of log(total norm), an EMA after warm-up),
    per-parameter counts of consecutive checks with a dead gradient, the
    number of consecutive checks whose step the policy skipped, each
    low-precision (16- or 8-bit float) parameter's largest magnitude at the last check (as a
    fraction of its dtype's maximum; 0: not seen), and each parameter's
    gradient status (`UNDECIDED`: no gradient seen yet,
    `STRUCTURAL`: zero by construction, `LEARNS`, `UNREACHED`: no gradient in
    any check so far while others had one; a state saved without it starts
    undecided)."""

    count: torch.Tensor  # int64 []
    mean: torch.Tensor  # float64 []
    var: torch.Tensor  # float64 []
    dead: torch.Tensor  # int64 [params]
    skips: torch.Tensor = None  # int64 []
    structural: torch.Tensor = None  # int64 [params]
    peak: torch.Tensor = None  # float64 [params]

    def __post_init__(self):
        if self.skips is None:
            self.skips = torch.zeros((), dtype=torch.int64, device=self.count.device)
        if self.structural is None:
            self.structural = torch.full_like(self.dead, UNDECIDED)
        if self.peak is None:
            self.peak = torch.zeros_like(self.dead, dtype=torch.float64)

    @staticmethod
    def zeros(num_params: int, device="cpu") -> RunningState:
        z = torch.zeros((), dtype=torch.float64, device=device)
        return RunningState(torch.zeros((), dtype=torch.int64, device=device), z, z.clone(),
                            torch.zeros(num_params, dtype=torch.int64, device=device))

    def to(self, device) -> RunningState:
        return RunningState(**{k: v.to(device) for k, v in self.state_dict().items()})

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var, "dead": self.dead,
                "skips": self.skips, "structural": self.structural, "peak": self.peak}

    @staticmethod
    def from_state_dict(d: dict) -> RunningState:
        return RunningState(d["count"], d["mean"], d["var"], d["dead"], d.get("skips"),
                            d.get("structural"), d.get("peak"))


# A parameter's gradient status: no check has seen its gradient yet; its
# gradient has been zero up to rounding at every check so far; it had a real
# one; it has had none at any check while other parameters had one.
UNDECIDED, STRUCTURAL, LEARNS, UNREACHED = 0, 1, 2, 3
