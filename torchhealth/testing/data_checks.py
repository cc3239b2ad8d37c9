"""Checks of the data before it reaches a model: one batch (`check_batch`), a
whole `DataLoader` with an optional validation loader (`check_loader`), and
the train and eval transforms on the same sample (`check_transforms`).

Statistics of the inputs come from one `torchhealth.tensor_stats` call per
batch. Dimension 0 is the batch; "features" are the last dimension of 2-D
(N, F) and 3-D (N, L, F) inputs; images are 4-D in the given ``layout``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

import torchhealth

from .batch import Batch, as_batch
from .report import CheckResult, SanityReport, failed, not_applicable, passed
from .rng import seeded

LAYOUTS = ("NCHW", "NHWC", None)
_CHANNEL_COUNTS = (1, 3, 4)


class _Summary:
    """Running facts about the batches seen so far, read by the checks below."""

    def __init__(self):
        self.batches = self.samples = 0
        self.nonfinite: dict[str, int] = {}
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.whole: dict[str, bool] = {}  # every value a whole number (raw pixels?)
        self.shapes: dict[str, list[int]] = {}
        self.first: Batch | None = None
        self.feature_lo: dict[str, torch.Tensor] = {}
        self.feature_hi: dict[str, torch.Tensor] = {}
        self.labels: tuple[int, int] | None = None

    def add(self, b: Batch) -> None:
        self.first = self.first or b
        self.batches += 1
        self.samples += b.size
        floats = [(n, t) for n, t in b.inputs if t.is_floating_point() and t.numel()]
        if floats:
            s = torchhealth.tensor_stats([t.detach() for _, t in floats], histogram=False).cpu()
            for k, (n, t) in enumerate(floats):
                self.nonfinite[n] = self.nonfinite.get(n, 0) + int(s.nonfinite[k])
                self.lo[n] = min(self.lo.get(n, float("inf")), float(s.min[k]))
                self.hi[n] = max(self.hi.get(n, float("-inf")), float(s.max[k]))
                whole = t.dim() == 4 and bool((t == t.round()).all())
                self.whole[n] = self.whole.get(n, True) and whole
                self.shapes.setdefault(n, list(t.shape))
                if t.dim() in (2, 3):
                    flat = t.detach().reshape(-1, t.shape[-1])
                    lo, hi = flat.amin(0), flat.amax(0)
                    self.feature_lo[n] = torch.minimum(self.feature_lo.get(n, lo), lo)
                    self.feature_hi[n] = torch.maximum(self.feature_hi.get(n, hi), hi)
        y = b.target
        if y is not None and y.numel() and not y.is_floating_point() and y.dtype != torch.bool:
            lo, hi = int(y.min()), int(y.max())
            self.labels = (lo, hi) if self.labels is None else (min(lo, self.labels[0]),
                                                                max(hi, self.labels[1]))


def _finite(s: _Summary) -> CheckResult:
    bad = [n for n, c in s.nonfinite.items() if c]
    if bad:
        return failed("inputs_finite", "NaN or Inf in the inputs: " + ", ".join(
            f"{n} holds {s.nonfinite[n]}" for n in bad), bad)
    if not s.nonfinite:
        return not_applicable("inputs_finite", "no floating-point input")
    return passed("inputs_finite", f"no NaN or Inf in {s.samples} samples")


def _range(s: _Summary, expect_range) -> CheckResult:
    if expect_range is not None:
        lo, hi = expect_range
        bad = [n for n in s.lo if s.lo[n] < lo or s.hi[n] > hi]
        if bad:
            return failed("input_range", "inputs outside the expected range "
                          f"[{lo:g}, {hi:g}]: " + ", ".join(
                              f"{n} spans [{s.lo[n]:.4g}, {s.hi[n]:.4g}]" for n in bad)
                          + " (images not normalised?)", bad)
        return passed("input_range", f"every input lies in [{lo:g}, {hi:g}]")
    raw = [n for n in s.lo if s.whole.get(n) and s.lo[n] >= 0 and 1.5 < s.hi[n] <= 255]
    if raw:
        return failed("input_range", ", ".join(raw) + " hold whole numbers up to "
                      f"{max(s.hi[n] for n in raw):g}: raw 0..255 pixels, images not normalised "
                      "(divide by 255 and normalise)", raw)
    return not_applicable("input_range", "expect_range= not given and no image looks like raw "
                          "0..255 pixels")


def _roughness(x: torch.Tensor) -> float:
    """Mean absolute difference between neighbouring pixels, along H and W."""
    return float((x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean())


def _interleaved(x: torch.Tensor) -> bool:
    """Whether ``x`` reads as (N, H, W, C) memory reshaped, not permuted, to
    (N, C, H, W): undoing that reshape makes the images at least twice as
    smooth. Smooth images only; on noise both readings are equally rough."""
    n, c, h, w = x.shape
    if c not in (2, 3, 4) or h < 2 or w < 2:
        return False
    x = x.detach().double()
    return _roughness(x.reshape(n, h, w, c).permute(0, 3, 1, 2)) < 0.5 * _roughness(x)


def _layout(s: _Summary, layout) -> CheckResult:
    images = {n: t for n, t in (s.first.inputs if s.first else []) if t.dim() == 4
              and t.is_floating_point()}
    if layout is None or not images:
        return not_applicable("layout", "layout=None" if layout is None else "no 4-D image input")
    problems = []
    for n, t in images.items():
        first, last = t.shape[1], t.shape[3]
        if layout == "NCHW" and last in _CHANNEL_COUNTS and first not in _CHANNEL_COUNTS:
            problems.append(f"{n} has shape {list(t.shape)}: channels last (NHWC) fed as NCHW; "
                            "use x.permute(0, 3, 1, 2)")
        elif layout == "NHWC" and first in _CHANNEL_COUNTS and last not in _CHANNEL_COUNTS:
            problems.append(f"{n} has shape {list(t.shape)}: channels first (NCHW) given for NHWC")
        elif layout == "NCHW" and _interleaved(t):
            problems.append(f"{n}: read as channels-last (NHWC) memory the images are more "
                            "than twice as smooth: NHWC data reshaped to NCHW; use "
                            "permute(0, 3, 1, 2) instead of view/reshape")
    if problems:
        return failed("layout", "; ".join(problems), [p.split(" ")[0].rstrip(":") for p in problems])
    return passed("layout", f"{', '.join(images)} look like {layout} images")


def _labels(s: _Summary, classes) -> CheckResult:
    if s.labels is None or classes is None:
        return not_applicable("labels", "no integer target" if s.labels is None
                              else "classes= not given")
    lo, hi = s.labels
    if lo == 1 and hi == classes:
        return failed("labels", f"labels run from 1 to {classes} for classes={classes}: they "
                      "start at 1, off by one (subtract 1)", ["target"], min=lo, max=hi)
    if lo < 0 or hi >= classes:
        return failed("labels", f"labels span [{lo}, {hi}], outside [0, {classes})",
                      ["target"], min=lo, max=hi)
    return passed("labels", f"labels span [{lo}, {hi}] within [0, {classes})")


def _constant(s: _Summary) -> CheckResult:
    if not s.feature_lo or s.samples < 2:
        return not_applicable("constant_features", "no 2-D or 3-D floating input with 2+ samples")
    bad = {n: (s.feature_lo[n] == s.feature_hi[n]).nonzero().flatten().tolist()
           for n in s.feature_lo}
    bad = {n: f for n, f in bad.items() if f}
    if bad:
        return failed("constant_features", "features that never vary: " + "; ".join(
            f"{n} features {f[:10]}" for n, f in bad.items()) + " (a broken column or a "
            "normalisation that divided by zero?)", list(bad))
    return passed("constant_features", f"every feature varies over {s.samples} samples")


def _report(s: _Summary, subject, expect_range, layout, classes) -> list[CheckResult]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return [_finite(s), _range(s, expect_range), _layout(s, layout), _labels(s, classes),
            _constant(s)]


def check_batch(batch: Any, *, expect_range: tuple[float, float] | None = None,
                layout: str | None = "NCHW", classes: int | None = None,
                target_key: str = "labels") -> SanityReport:
    """Check one batch (a tensor, a tuple ``(x..., y)`` or a dict; see
    `torchhealth.testing.batch`): non-finite inputs, values outside
    ``expect_range`` (or raw 0..255 pixels), 4-D images not in ``layout``,
    integer labels outside ``[0, classes)`` or starting at 1, constant features."""
    s = _Summary()
    s.add(as_batch(batch, target_key=target_key))
    return SanityReport(tuple(_report(s, "batch", expect_range, layout, classes)), "batch")


def _fingerprints(b: Batch, weights: dict[int, torch.Tensor]) -> list[tuple[int, int]]:
    """A 128-bit content hash of each sample's inputs (integer arithmetic, exact)."""
    row = torch.cat([t.detach().cpu().contiguous().reshape(b.size, -1).view(torch.uint8)
                     .reshape(b.size, -1) for _, t in b.inputs], dim=1).long()
    if row.shape[1] not in weights:
        gen = torch.Generator().manual_seed(row.shape[1])
        weights[row.shape[1]] = torch.randint(-2**62, 2**62, (row.shape[1], 2), generator=gen)
    h = (row[:, :, None] * weights[row.shape[1]]).sum(1)
    return [tuple(r) for r in h.tolist()]


def check_loader(loader: Iterable, *, val_loader: Iterable | None = None,
                 expect_range: tuple[float, float] | None = None, layout: str | None = "NCHW",
                 classes: int | None = None, max_batches: int | None = None,
                 target_key: str = "labels") -> SanityReport:
    """Walk ``loader`` (at most ``max_batches`` batches) with the checks of
    `check_batch` over all its batches together; with ``val_loader``, also
    check that no sample of the validation split is identical to a training one."""
    s, weights, seen = _Summary(), {}, set()
    for k, batch in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        b = as_batch(batch, target_key=target_key)
        s.add(b)
        if val_loader is not None:
            seen.update(_fingerprints(b, weights))
    if not s.batches:
        raise ValueError("check_loader: the loader yielded no batch")
    results = _report(s, "loader", expect_range, layout, classes)
    if val_loader is None:
        results.append(not_applicable("split_overlap", "val_loader= not given"))
    else:
        dup = total = 0
        for batch in val_loader:
            fps = _fingerprints(as_batch(batch, target_key=target_key), weights)
            total += len(fps)
            dup += sum(f in seen for f in fps)
        results.append(failed("split_overlap", f"{dup} of {total} validation samples also appear "
                              "in the training split (leakage: validation scores will be "
                              "optimistic)", ["val_loader"], duplicates=dup) if dup else
                       passed("split_overlap", f"none of {total} validation samples appears in "
                              f"the {s.samples} training samples"))
    return SanityReport(tuple(results), "loader")


def check_transforms(sample: Any, train_transform: Callable, eval_transform: Callable, *,
                     repeats: int = 8, seed: int = 0) -> SanityReport:
    """Apply both transforms to the same raw ``sample``: same shape and dtype,
    a deterministic eval transform, and the same scale (the eval output's mean
    within half a standard deviation of the train outputs', its standard
    deviation within 2x): a Normalize in one transform but not the other fails."""
    with seeded(seed):
        train = [train_transform(sample) for _ in range(repeats)]
        ev, ev2 = eval_transform(sample), eval_transform(sample)
    for name, t in (("train_transform", train[0]), ("eval_transform", ev)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"check_transforms: {name} returned a {type(t).__name__}, not a tensor")
    results = []
    if train[0].shape != ev.shape or train[0].dtype != ev.dtype:
        results.append(failed("transform_shape", f"train gives {list(train[0].shape)} "
                              f"{train[0].dtype}, eval gives {list(ev.shape)} {ev.dtype}",
                              ["eval_transform"]))
    else:
        results.append(passed("transform_shape", f"both give {list(ev.shape)} {ev.dtype}"))
    results.append(passed("eval_deterministic", "the eval transform gives the same output twice")
                   if torch.equal(ev, ev2) else
                   failed("eval_deterministic", "the eval transform gives different outputs for "
                          "the same sample (a random augmentation left in it)", ["eval_transform"]))
    t = torch.stack([x.double().flatten() for x in train]) if results[0].passed else None
    if t is None:
        results.append(not_applicable("transform_scale", "the shapes differ"))
    else:
        tm, ts, em, es = t.mean(), t.std(), ev.double().mean(), ev.double().std()
        ok = abs(em - tm) <= 0.5 * ts + 1e-6 and (es <= 2 * ts + 1e-6) and (ts <= 2 * es + 1e-6)
        msg = (f"train outputs have mean {tm:.4g} and std {ts:.4g}, eval mean {em:.4g} and "
               f"std {es:.4g}")
        results.append(passed("transform_scale", msg) if ok else failed(
            "transform_scale", msg + ": the transforms scale differently (a Normalize or "
            "ToTensor in one but not the other?)", ["eval_transform"]))
    return SanityReport(tuple(results), "transforms")
