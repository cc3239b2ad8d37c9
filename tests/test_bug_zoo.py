"""The bug zoo: small correct models pass every sanity check, and the same
models with one planted bug each are caught by the check meant for that bug,
with a message that names it. `benchmarks/bench_sanity.py` imports ZOO."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchhealth.testing import check_batch, check_loader, check_model, data

CE = nn.CrossEntropyLoss()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared machine: a second OpenMP thread costs more than it saves.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MLP(nn.Module):
    def __init__(self, features=4, hidden=32, classes=3, out="logits", activation=True,
                 unused=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(features, hidden), nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)
        self.aux = nn.Linear(hidden, hidden) if unused else None
        self.out, self.activation = out, activation

    def forward(self, x):
        h = self.fc1(x)
        h = F.relu(self.fc2(F.relu(h) if self.activation else h))
        if self.aux is not None:
            self.aux(h)  # planted: computed, never used
        z = self.fc3(h)
        if self.out == "softmax":
            return z.softmax(1)
        return z.log_softmax(1) if self.out == "log_softmax" else z


class CNN(nn.Module):
    def __init__(self, classes=4, mix_batch=False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8 * 4 * 4, classes)
        self.mix_batch = mix_batch

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.bn(self.conv2(h))), 2)
        n = h.shape[0]
        # planted: a reshape that interleaves samples instead of flattening each one
        h = h.transpose(0, 1).reshape(n, -1) if self.mix_batch else h.flatten(1)
        return self.head(self.drop(h))


class GRUNet(nn.Module):
    def __init__(self, features=4, hidden=16, classes=2, batch_first=True):
        super().__init__()
        # planted when batch_first=False: the batch is read as time, so samples mix
        self.gru = nn.GRU(features, hidden, batch_first=batch_first)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class Block(nn.Module):
    def __init__(self, d, mix_batch=False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.mix_batch = mix_batch

    def forward(self, x):
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        if self.mix_batch:  # planted: attention over the batch instead of the tokens
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(0, 1) if self.mix_batch else a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=16, d=16, length=12, classes=2, mix_batch=False, unused=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, length, d) * 0.1)
        self.block = Block(d, mix_batch)
        self.extra = Block(d) if unused else None
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, tokens):
        x = self.block(self.embed(tokens) + self.pos)
        if self.extra is not None:
            self.extra(x)  # planted: a block whose output is dropped
        return self.head(self.ln(x).mean(1))


def validate(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch[0])


def validate_without_eval(model, batch):  # planted: model.eval() forgotten
    with torch.no_grad():
        return model(batch[0])


def _seeded(make):
    torch.manual_seed(0)
    return make()


# name -> (model factory, batch, loss, check_model keyword arguments)
ZOO = {
    "mlp": (MLP, data.blobs(64, classes=3, features=4).batch(32), CE, dict(classes=3)),
    "cnn": (CNN, data.images(32).batch(32), CE, dict(classes=4, evaluate=validate,
                                                     expect_range=(0, 1))),
    "gru": (GRUNet, data.sequences(32).batch(32), CE, dict(classes=2)),
    "transformer": (TinyTransformer, dict(zip(("tokens", "labels"), data.tokens(32))), CE,
                    dict(classes=2)),
}


@pytest.mark.parametrize("name", ZOO)
def test_correct_models_pass_every_check(name):
    make, batch, loss, kwargs = ZOO[name]
    report = check_model(_seeded(make), batch, loss, **kwargs)
    assert report.ok, str(report)
    assert all(report[n].passed for n in ("finite", "connected", "params_update", "logits",
                                          "init_loss", "nonlinearity", "batch_independent",
                                          "overfits")), str(report)


def test_correct_cnn_with_frozen_layer_listed_passes():
    make, batch, loss, kwargs = ZOO["cnn"]
    model = _seeded(make)
    model.conv1.requires_grad_(False)
    report = check_model(model, batch, loss, frozen=["conv1"], **kwargs)
    assert report.ok and report["frozen"].passed, str(report)


def _caught(report, check, *phrases, names=()):
    result = report[check]
    assert result.failed, str(report)
    for phrase in phrases:
        assert phrase in result.message, result.message
    for name in names:
        assert any(name in n for n in result.names), result.names


def _check(name, model, batch=None, loss=None, check=None, **extra):
    make, zoo_batch, zoo_loss, kwargs = ZOO[name]
    return check_model(_seeded(lambda: model), zoo_batch if batch is None else batch,
                       loss or zoo_loss, checks=(check,), **{**kwargs, **extra})


def test_accidentally_frozen_layer():
    model = _seeded(MLP)
    model.fc2.requires_grad_(False)
    _caught(_check("mlp", model, check="params_update"), "params_update",
            "fc2 has requires_grad=False but is not listed in frozen=", names=["fc2.weight"])


@pytest.mark.parametrize("name,model,module", [
    ("mlp", lambda: MLP(unused=True), "aux"),
    ("transformer", lambda: TinyTransformer(unused=True), "extra.")])
def test_layer_whose_output_is_never_used(name, model, module):
    _caught(_check(name, _seeded(model), check="connected"), "connected",
            "get no gradient", "output is never used", names=[module])


def test_missing_activation_between_linears():
    _caught(_check("mlp", _seeded(lambda: MLP(activation=False)), check="nonlinearity"),
            "nonlinearity", "no activation between", names=["fc1 -> fc2"])


def test_softmax_applied_twice():
    _caught(_check("mlp", _seeded(lambda: MLP(out="softmax")), check="logits"), "logits",
            "softmax is applied twice")


def test_log_softmax_fed_to_cross_entropy():
    _caught(_check("mlp", _seeded(lambda: MLP(out="log_softmax")), check="logits"), "logits",
            "log-softmax fed to CrossEntropyLoss")


@pytest.mark.parametrize("name,model", [
    ("cnn", lambda: CNN(mix_batch=True)), ("gru", lambda: GRUNet(batch_first=False)),
    ("transformer", lambda: TinyTransformer(mix_batch=True))])
def test_batch_mixing(name, model):
    _caught(_check(name, _seeded(model), check="batch_independent"), "batch_independent",
            "depends on the inputs of", "mixes the batch dimension", "eval mode")


def test_labels_off_by_one():
    x, y = ZOO["mlp"][1]
    _caught(check_batch((x, y + 1), classes=3), "labels", "start at 1, off by one")
    report = check_model(_seeded(MLP), (x, y + 1), CE, classes=3)
    _caught(report, "labels", "off by one")
    _caught(report, "forward", "loss_fn raised")  # CrossEntropyLoss meets label 3
    loader = data.Data(x, y + 1).loader(8)
    _caught(check_loader(loader, classes=3), "labels", "off by one")


def test_images_not_normalised():
    x, y = ZOO["cnn"][1]
    raw = (x * 255).round()
    _caught(check_batch((raw, y)), "input_range", "raw 0..255 pixels", "not normalised")
    _caught(check_batch((raw, y), expect_range=(0, 1)), "input_range", "images not normalised")
    _caught(_check("cnn", _seeded(CNN), batch=(raw, y), check="input_range"), "input_range",
            "not normalised")


def test_nhwc_fed_as_nchw():
    x, y = ZOO["cnn"][1]
    nhwc = x.permute(0, 2, 3, 1).contiguous()  # what an HWC image pipeline yields
    _caught(check_batch((nhwc.reshape(x.shape), y)), "layout", "reshaped to NCHW")
    _caught(check_batch((nhwc, y)), "layout", "channels last (NHWC) fed as NCHW")
    _caught(_check("cnn", _seeded(CNN), batch=(nhwc.reshape(x.shape), y), check="layout"),
            "layout", "permute(0, 3, 1, 2)")


def test_eval_forgotten_in_validation():
    _caught(_check("cnn", _seeded(CNN), check="eval_mode", evaluate=validate_without_eval),
            "eval_mode", "model.eval() forgotten", names=["drop", "bn"])


def test_loss_with_flipped_sign():
    def flipped(out, y):
        return -F.cross_entropy(out, y)

    report = _check("mlp", _seeded(MLP), loss=flipped, check="init_loss")
    _caught(report, "init_loss", "flipped sign")
    _caught(_check("mlp", _seeded(MLP), loss=flipped, check="overfits"), "overfits",
            "flipped sign")


def test_correct_data_passes_the_data_checks():
    images = data.images(64)
    loader = images.loader(16)
    val = data.images(32, seed=1).loader(16)
    report = check_loader(loader, val_loader=val, classes=4, expect_range=(0, 1))
    assert report.ok and report["split_overlap"].passed and report["layout"].passed, str(report)
    leaky = check_loader(loader, val_loader=data.Data(*images.batch(8, 20)).loader(4), classes=4)
    _caught(leaky, "split_overlap", "8 of 8 validation samples")
