"""Synthetic data (`torchhealth.testing.data`) and the data checks (`check_batch`,
`check_loader`, `check_transforms`)."""
import math

import pytest
import torch

from torchhealth.testing import check_batch, check_loader, check_transforms, data

from test_bug_zoo import one_thread  # noqa: F401  (autouse fixture)

MAKERS = [data.sines, data.blobs, data.images, data.sequences, data.tokens]


@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__)
def test_seeded_and_deterministic(make):
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    state = torch.get_rng_state()
    make()
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used


def test_sines_known_answer():
    x, y = data.sines(2000, features=3, noise=0.1)
    clean = torch.sin(x * torch.arange(1, 4)).sum(1) + torch.cos(x[:, 0] * x[:, -1])
    assert x.shape == (2000, 3) and y.shape == (2000, 1)
    assert x.abs().max() <= math.pi
    assert abs(float((y[:, 0] - clean).std()) - 0.1) < 0.01


def test_blobs_balance_imbalance_and_overlap():
    d = data.blobs(301, classes=4)
    assert torch.bincount(d.y).tolist() == [76, 75, 75, 75] and d.classes == 4
    imb = data.blobs(100, classes=2, weights=[0.9, 0.1])
    assert torch.bincount(imb.y).tolist() == [90, 10]
    exact = data.blobs(30, classes=3, overlap=0.0)
    assert len({tuple(r) for r in exact.x.tolist()}) == 3  # every point on its centre
    # more overlap: a nearest-centre classifier gets fewer right
    def nearest_centre_accuracy(d):
        centres = torch.stack([d.x[d.y == k].mean(0) for k in range(3)])
        return float(((d.x[:, None] - centres).norm(dim=2).argmin(1) == d.y).float().mean())
    assert nearest_centre_accuracy(data.blobs(600, overlap=0.1)) > nearest_centre_accuracy(
        data.blobs(600, overlap=1.0))
    with pytest.raises(ValueError, match="weights must be 3 non-negative numbers"):
        data.blobs(10, weights=[1, 2])


def test_gap_split_holds_out_a_band():
    d = data.sines(1000)
    split = data.gap_split(d, dim=0, gap=(0.4, 0.6))
    assert len(split.train) + len(split.ood) == 1000 and 180 <= len(split.ood) <= 220
    lo, hi = split.ood.x[:, 0].min(), split.ood.x[:, 0].max()
    band = (split.train.x[:, 0] >= lo) & (split.train.x[:, 0] <= hi)
    assert not band.any()


def test_images_known_answer():
    d = data.images(40, size=16, classes=4)
    assert d.x.shape == (40, 3, 16, 16) and 0 <= d.x.min() and d.x.max() <= 1
    assert torch.bincount(d.y).tolist() == [10] * 4
    # the brightest pixel's angle around the centre gives the label
    flat = d.x.sum(1).flatten(1).argmax(1)
    r, c = flat // 16 + 0.5 - 8, flat % 16 + 0.5 - 8
    angle = torch.atan2(r.double(), c.double()) % (2 * math.pi)
    assert torch.equal(torch.round(angle / (math.pi / 2)).long() % 4, d.y)


def test_sequences_and_tokens_follow_their_rule():
    s = data.sequences(50)
    assert torch.equal(s.y, (s.x[:, :, 0].mean(1) > 0).long())
    t = data.tokens(50, vocab=8)
    assert t.x.dtype == torch.int64 and t.x.max() < 8
    assert torch.equal(t.y, ((t.x == 1).sum(1) > (t.x == 2).sum(1)).long())


def test_check_batch_non_finite_and_constant_features():
    x, y = data.blobs(32, features=3)
    x = x.clone()
    x[:, 1] = 7.0
    x[5, 0] = float("nan")
    report = check_batch((x, y), classes=3)
    assert report["inputs_finite"].failed and "inputs[0] holds 1" in report["inputs_finite"].message
    assert report["constant_features"].failed and "features [1]" in report["constant_features"].message
    assert report["labels"].passed
    with pytest.raises(ValueError, match="layout must be one of"):
        check_batch(x, layout="CHW")


def test_check_batch_labels_out_of_range_and_layouts():
    x, y = data.images(16)
    assert check_batch((x, y + 3), classes=4)["labels"].message.startswith("labels span [3, 6]")
    assert check_batch((x, y), layout="NCHW")["layout"].passed
    assert check_batch((x.permute(0, 2, 3, 1), y), layout="NHWC")["layout"].passed
    assert check_batch((x, y), layout="NHWC")["layout"].failed
    noise = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert check_batch(noise)["layout"].passed  # no smoothness, no false alarm


def test_check_loader_walks_every_batch():
    x, y = data.blobs(64, features=2)
    x = x.clone()
    x[50, 1] = float("inf")
    report = check_loader(data.Data(x, y).loader(16), classes=3)
    assert report["inputs_finite"].failed  # in the fourth batch
    assert report["split_overlap"].status.value == "not applicable"
    assert check_loader(data.Data(x, y).loader(16), classes=3, max_batches=3)["inputs_finite"].passed
    with pytest.raises(ValueError, match="the loader yielded no batch"):
        check_loader([])


def _flip(x):
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def test_check_transforms():
    raw = data.images(1).x[0]

    def normalise(t):
        return (t - 0.1) / 0.2

    report = check_transforms(raw, lambda s: normalise(_flip(s)), normalise)
    assert report.ok, str(report)
    forgot = check_transforms(raw, lambda s: normalise(_flip(s)), lambda s: s)
    assert forgot["transform_scale"].failed and "scale differently" in forgot["transform_scale"].message
    random_eval = check_transforms(raw, _flip, _flip, seed=1)
    assert random_eval["eval_deterministic"].failed
    shape = check_transforms(raw, lambda s: s, lambda s: s[:, :8])
    assert shape["transform_shape"].failed and shape["transform_scale"].status.value == "not applicable"
