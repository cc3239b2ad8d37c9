"""Small synthetic data sets with a known answer, seeded and deterministic.

Each function draws from its own ``torch.Generator`` seeded with ``seed`` (the
global RNG is untouched), so the same arguments give the same tensors on every
run and machine. Results are `Data` (``x, y = data`` unpacks) or `GapSplit`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Data:
    """Inputs ``x`` (dimension 0 is the sample) and targets ``y``."""

    x: torch.Tensor
    y: torch.Tensor
    classes: int | None = None  # for classification

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.x, self.y))

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, size: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start + size - 1`` as an ``(x, y)`` tuple."""
        return self.x[start:start + size], self.y[start:start + size]

    def loader(self, batch_size: int, **kwargs) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y),
                                           batch_size=batch_size, **kwargs)


@dataclass(frozen=True)
class GapSplit:
    """In-distribution samples (``train``) and the held-out gap (``ood``)."""

    train: Data
    ood: Data


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sines(n: int = 256, features: int = 2, noise: float = 0.1, seed: int = 0) -> Data:
    """Regression: ``x`` uniform in [-pi, pi]^features, float32 ``[n, features]``;
    ``y[:, 0] = sum_k sin((k + 1) x_k) + cos(x_0 x_last) + noise * N(0, 1)``
    (``[n, 1]``). The noise-free part is the known answer: a model that fits
    well reaches a mean squared error near ``noise**2``."""
    g = _gen(seed)
    x = (torch.rand(n, features, generator=g) * 2 - 1) * math.pi
    k = torch.arange(1, features + 1, dtype=x.dtype)
    clean = torch.sin(x * k).sum(1) + torch.cos(x[:, 0] * x[:, -1])
    return Data(x, (clean + noise * torch.randn(n, generator=g))[:, None])


def blobs(n: int = 300, classes: int = 3, features: int = 2, overlap: float = 0.2,
          weights: Sequence[float] | None = None, seed: int = 0) -> Data:
    """Classification: one Gaussian blob per class. Centres are ``classes``
    random unit-norm directions scaled by 3; each blob has standard deviation
    ``3 * overlap`` (0 gives points on the centres, about 0.5 makes neighbours
    overlap). ``weights`` (one per class, normalised) makes the classes
    imbalanced; by default they are balanced (counts differ by at most one).
    ``x`` float32 ``[n, features]``, ``y`` int64 ``[n]`` in ``[0, classes)``,
    shuffled."""
    g = _gen(seed)
    centres = torch.randn(classes, features, generator=g)
    centres = 3 * centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = torch.ones(classes) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.numel() != classes or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blobs: weights must be {classes} non-negative numbers, got {weights}")
    counts = torch.floor(w / w.sum() * n).long()
    counts[: n - int(counts.sum())] += 1
    y = torch.repeat_interleave(torch.arange(classes), counts)
    x = centres[y] + 3 * overlap * torch.randn(n, features, generator=g)
    order = torch.randperm(n, generator=g)
    return Data(x[order], y[order], classes)


def gap_split(data: Data, *, dim: int = 0, gap: tuple[float, float] = (0.4, 0.6)) -> GapSplit:
    """Hold out the samples whose feature ``dim`` lies in the middle band given
    by quantiles ``gap`` of that feature: a region the model never sees in
    training, for out-of-distribution (interpolation) tests."""
    v = data.x[:, dim].double()
    lo, hi = torch.quantile(v, torch.tensor(gap, dtype=torch.float64)).tolist()
    inside = (v >= lo) & (v <= hi)
    return GapSplit(Data(data.x[~inside], data.y[~inside], data.classes),
                    Data(data.x[inside], data.y[inside], data.classes))


def images(n: int = 64, size: int = 16, channels: int = 3, classes: int = 4,
           noise: float = 0.02, seed: int = 0) -> Data:
    """Images with a known answer: a bright Gaussian spot in one of
    ``classes`` positions on a circle around the centre; the label is the
    position. ``x`` float32 ``[n, channels, size, size]`` (NCHW) in [0, 1],
    smooth apart from ``noise`` (each channel a random tint of the spot); ``y`` int64 ``[n]``, balanced."""
    g = _gen(seed)
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    angle = 2 * math.pi * y.double() / classes
    cy = size / 2 + size / 4 * torch.sin(angle)
    cx = size / 2 + size / 4 * torch.cos(angle)
    grid = torch.arange(size, dtype=torch.float64) + 0.5
    d2 = (grid[None, :, None] - cy[:, None, None]) ** 2 + (grid[None, None, :] - cx[:, None, None]) ** 2
    spot = torch.exp(-d2 / (2 * (size / 5) ** 2)).float()
    tint = 0.2 + 0.8 * torch.rand(n, channels, 1, 1, generator=g)
    x = spot[:, None] * tint + noise * torch.rand(n, channels, size, size, generator=g)
    return Data(x.clamp(0, 1), y, classes)


def sequences(n: int = 128, length: int = 12, features: int = 4, seed: int = 0) -> Data:
    """Sequence classification: ``x`` float32 ``[n, length, features]`` from
    N(0, 1); ``y`` is 1 when the first feature's mean over time is positive,
    else 0 (int64 ``[n]``, two classes)."""
    x = torch.randn(n, length, features, generator=_gen(seed))
    return Data(x, (x[:, :, 0].mean(1) > 0).long(), 2)


def tokens(n: int = 128, length: int = 12, vocab: int = 16, seed: int = 0) -> Data:
    """Token classification: ``x`` int64 ``[n, length]`` uniform in
    ``[0, vocab)``; ``y`` is 1 when token 1 occurs more often than token 2,
    else 0 (int64 ``[n]``, two classes)."""
    x = torch.randint(0, vocab, (n, length), generator=_gen(seed))
    return Data(x, ((x == 1).sum(1) > (x == 2).sum(1)).long(), 2)
