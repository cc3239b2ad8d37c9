"""Precision and recall of the checks with the default settings.

Healthy zoo: standard models (tiny, random init, no download) trained for a few
dozen steps; every warning or error is a false alarm (info findings are
counted apart). Faulty zoo: one fault injected at a known step; how many steps
until a warning or error, and whether the report's primary finding names the
expected check.

    PYTHONPATH=. python benchmarks/bench_checks.py [--steps 40] [--only NAME ...]

Prints a Markdown table (the one in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass, field
from collections.abc import Callable

import torch
from torch import nn

import torchhealth as th
from torchhealth import demo

F = nn.functional


@dataclass
class Case:
    model: nn.Module
    batch: Callable[[int], tuple]
    loss: Callable  # (model, x, y) -> loss
    lr: float = 1e-3
    autocast: torch.dtype | None = None
    scaler: bool = False
    inject: int | None = None  # the fault's step (faulty zoo)
    expect: str = ""  # the check that should be primary at detection
    hook: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None  # before step i
    opt: Callable | None = None  # params -> optimizer (default Adam(lr))
    steps: int | None = None
    extra: dict = field(default_factory=dict)


def _gen(i):
    return torch.Generator().manual_seed(1000 + i)


def images(i, n=16, size=12, classes=10):
    g = _gen(i)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def tokens(i, vocab=64, n=8, length=12):
    x = torch.randint(0, vocab, (n, length), generator=_gen(i))
    return x, x


def regression(i, features=16, n=64):
    g = _gen(i)
    x = torch.randn(n, features, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def ce(m, x, y):
    return F.cross_entropy(m(x), y)


def mse(m, x, y):
    return F.mse_loss(m(x).float(), y.float())


def hf_loss(m, x, y):
    return m(input_ids=x, labels=y).loss


def mlp(act=nn.ReLU, width=64, depth=2, features=16):
    layers, d = [], features
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


def cnn_bias_bn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


def resnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class RNNLM(nn.Module):
    def __init__(self, cell, vocab=64, dim=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = cell(dim, dim, num_layers=2, batch_first=True)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0])


def lm_loss(m, x, y):
    logits = m(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))


class MoE(nn.Module):
    """A mixture-of-experts layer with dense softmax gating (every expert gets
    its gate's share of the gradient)."""

    def __init__(self, features=16, experts=4, width=32):
        super().__init__()
        self.gate = nn.Linear(features, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(features, width), nn.GELU(),
                                                   nn.Linear(width, 1)) for _ in range(experts))

    def forward(self, x):
        w = self.gate(x).softmax(-1)
        return (torch.stack([e(x) for e in self.experts], -1) * w[:, None, :]).sum(-1)


class TwoHeads(nn.Module):
    """A two-task model trained on one task: the second head's output is
    computed but the loss never reaches it (grad None at every step)."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.other = mlp(depth=1)[:2], nn.Linear(64, 1), nn.Linear(64, 3)

    def forward(self, x):
        h = self.body(x)
        self.aux_out = self.other(h)
        return self.head(h)


def frozen():
    m = mlp(depth=3)
    for p in m[0].parameters():
        p.requires_grad_(False)
    return m


def hf(name):
    import transformers as T

    T.logging.set_verbosity_error()
    V = 64
    if name == "bert":
        return T.BertForMaskedLM(T.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64,
                                              max_position_embeddings=32))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(
            image_size=12, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=10))
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_heads=4, decoder_start_token_id=0))


def healthy() -> dict[str, Callable[[], Case]]:
    return {
        "MLP (ReLU, Adam)": lambda: Case(mlp(), regression, mse),
        "CNN, Conv2d(bias) -> BatchNorm2d": lambda: Case(cnn_bias_bn(), images, ce),
        "ResNet-style (3 blocks)": lambda: Case(resnet(), images, ce),
        "LSTM LM (2 layers)": lambda: Case(RNNLM(nn.LSTM), tokens, lm_loss),
        "GRU LM (2 layers)": lambda: Case(RNNLM(nn.GRU), tokens, lm_loss),
        "HF BERT (MLM)": lambda: Case(hf("bert"), tokens, hf_loss),
        "HF GPT-2 (LM)": lambda: Case(hf("gpt2"), tokens, hf_loss),
        "HF ViT (classification)": lambda: Case(hf("vit"), images,
                                                lambda m, x, y: m(pixel_values=x, labels=y).loss),
        "HF T5 (seq2seq)": lambda: Case(hf("t5"), tokens, hf_loss),
        "MoE, softmax gating (4 experts)": lambda: Case(MoE(), regression, mse),
        "MLP, first layer frozen": lambda: Case(frozen(), regression, mse),
        "MLP, a second head the loss does not use": lambda: Case(TwoHeads(), regression, mse),
        "CNN, bfloat16 autocast": lambda: Case(cnn_bias_bn(), images, ce, autocast=torch.bfloat16),
        "HF BERT, bfloat16 autocast": lambda: Case(hf("bert"), tokens, hf_loss, autocast=torch.bfloat16),
        "MLP, float16 autocast + GradScaler": lambda: Case(mlp(), regression, mse, autocast=torch.float16,
                                                           scaler=True),
        "MLP, float16 weights (SGD)": lambda: Case(mlp().half(), _scaled(10**9, regression, 1.0), mse,
                                                   opt=lambda p: torch.optim.SGD(p, lr=1e-2)),
    }


# -- the faulty zoo -------------------------------------------------------------------------
def _nan_at(step, batch):
    def fn(i):
        x, y = batch(i)
        if i == step:
            x = x.clone()
            x.view(-1)[3] = math.nan
        return x, y
    return fn


def _set_lr(step, lr):
    def hook(i, model, opt):
        if i == step:
            for g in opt.param_groups:
                g["lr"] = lr
    return hook


def _zero(step, name):
    def hook(i, model, opt):
        if i == step:
            with torch.no_grad():
                dict(model.named_parameters())[name].zero_()
    return hook


class Detachable(nn.Module):
    """An MLP whose first layer stops receiving gradients from `frozen_from` on
    (its output is detached: a layer frozen by mistake)."""

    def __init__(self, frozen_from):
        super().__init__()
        self.net = mlp(depth=2)
        self.frozen_from, self.calls = frozen_from, 0

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        if self.calls >= self.frozen_from:
            h = h.detach()
        self.calls += 1
        return self.net[4](self.net[3](self.net[2](h)))


def _scaled(step, batch, factor):
    def fn(i):
        x, y = batch(i)
        return (x * factor if i >= step else x).half(), y.half()
    return fn


AT = 15  # the step the injected faults appear at


def faulty() -> dict[str, Callable[[], Case]]:
    cases: dict[str, Callable[[], Case]] = {}
    for name in demo.SCENARIOS:
        def make(name=name):
            s = demo.setup(name)
            return Case(s.model, s.batch, lambda m, x, y, s=s: s.loss(m(x), y), inject=s.inject_step or 0,
                        expect=s.expect[0], opt=lambda params, s=s: s.optimizer, steps=s.steps)
        cases[f"demo `{name}`"] = make
    cases.update({
        "CNN, NaN in one batch": lambda: Case(cnn_bias_bn(), _nan_at(AT, images), ce, inject=AT,
                                              expect="nonfinite"),
        "MLP, lr x1000 mid-run (Adam 1e-3 -> 1)": lambda: Case(mlp(), regression, mse, inject=AT,
                                                               expect="exploding", hook=_set_lr(AT, 1.0)),
        "MLP, a layer's weights zeroed mid-run": lambda: Case(mlp(depth=3), regression, mse, inject=AT,
                                                              expect="vanishing", hook=_zero(AT, "2.weight")),
        "float16 MLP, inputs x3000 mid-run (overflow)": lambda: Case(
            mlp().half(), _scaled(AT, regression, 3000.0), mse, inject=AT, expect="nonfinite",
            opt=lambda p: torch.optim.SGD(p, lr=1e-3)),
        "MLP, a layer frozen by mistake (detached)": lambda: Case(Detachable(AT), regression, mse,
                                                                  inject=AT, expect="dead"),
    })
    return cases


def run(case: Case, steps: int) -> list[th.Report]:
    torch.manual_seed(0)
    steps = case.steps or steps
    model = case.model
    opt = case.opt(model.parameters()) if case.opt else torch.optim.Adam(model.parameters(), lr=case.lr)
    reports: list[th.Report] = []
    wrapped = th.HealthCheckedOptimizer(opt, model=model, on_report=reports.append)
    scaler = torch.amp.GradScaler("cpu") if case.scaler else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(steps):
            if case.hook:
                case.hook(i, model, wrapped)
            x, y = case.batch(i)
            wrapped.zero_grad()
            with torch.autocast("cpu", dtype=case.autocast or torch.bfloat16, enabled=case.autocast is not None):
                loss = case.loss(model, x, y)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(wrapped)
                scaler.update()
            else:
                loss.backward()
                wrapped.step()
        wrapped.flush()
    return reports


def alarms(r: th.Report) -> list[th.report.Finding]:
    return [f for f in r.findings if f.severity in ("warning", "error")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of case names")
    ap.add_argument("--zoo", choices=("healthy", "faulty", "both"), default="both")
    args = ap.parse_args(argv)
    pick = lambda zoo: {k: v for k, v in zoo.items()
                        if not args.only or any(s.lower() in k.lower() for s in args.only)}
    t0 = time.perf_counter()
    print(f"torchhealth {th.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"default settings, {args.steps} steps per healthy model\n")
    print("| healthy model | tensors | warnings / 100 steps | checks that warned | info findings (once each) |")
    print("|---|---:|---:|---|---|")
    total_alarms = total_steps = 0
    for name, make in (pick(healthy()) if args.zoo != "faulty" else {}).items():
        reports = run(make(), args.steps)
        bad = [f for r in reports for f in alarms(r)]
        info = [f for r in reports for f in r.findings if f.severity == "info"]
        total_alarms += len(bad)
        total_steps += len(reports)
        checks = ", ".join(sorted({f.check for f in bad})) or "-"
        notes = "; ".join(f"{len(f.names)} x {f.message.split(':')[0].split(' (')[0]} (step {r.step})"
                          for r in reports for f in r.findings if f.severity == "info") or "-"
        grads = sum(1 for row in reports[0].rows if row.role == "grad")
        print(f"| {name} | {grads} | {100 * len(bad) / max(len(reports), 1):.0f} | {checks} | "
              f"{notes if info else '-'} |", flush=True)
    print(f"\nfalse alarms: {total_alarms} in {total_steps} healthy steps\n")
    print("| injected fault (at step) | steps to detection | primary finding at detection | expected | "
          "all findings at detection | false alarms before |")
    print("|---|---:|---|---|---|---:|")
    caught = right = 0
    cases = pick(faulty()) if args.zoo != "healthy" else {}
    for name, make in cases.items():
        case = make()
        reports = run(case, 30)
        before = sum(len(alarms(r)) for r in reports if r.step < case.inject)
        hit = next((r for r in reports if r.step >= case.inject and alarms(r)), None)
        if hit is None:
            print(f"| {name} ({case.inject}) | not caught | - | {case.expect} | - | {before} |")
            continue
        # getattr: the same table for versions whose findings had no primary mark
        primary = [f.check for f in hit.findings if getattr(f, "primary", False)]
        delay = hit.step - case.inject
        caught += delay <= 5
        right += primary == [case.expect]
        every = ", ".join(dict.fromkeys(f.check for f in alarms(hit)))
        print(f"| {name} ({case.inject}) | {delay} | {', '.join(primary) or 'n/a'} | {case.expect} | "
              f"{every} | {before} |", flush=True)
    print(f"\ncaught within 5 steps: {caught}/{len(cases)}; right primary check: {right}/{len(cases)}; "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
