"""Backend selection and the agreement of Python's layout with csrc/stats.h."""
import re
import subprocess
import sys
from pathlib import Path

import torchhealth
from torchhealth import stats as S

ROOT = Path(__file__).resolve().parents[1]


def test_python_layout_matches_the_header():
    header = (ROOT / "csrc" / "stats.h").read_text()
    enum = re.search(r"enum Column : int \{(.*?)\};", header, re.S).group(1)
    names = [n.split("=")[0].strip() for n in enum.split(",") if n.strip()]
    assert names == ["kNumel", "kNan", "kPosInf", "kNegInf", "kZero", "kSubnormal", "kSaturated",
                     "kNumCounts", "kMin", "kMax", "kAbsMax", "kSum", "kSumSq", "kCols"]
    assert [S.NUMEL, S.NAN, S.POSINF, S.NEGINF, S.ZERO, S.SUBNORMAL, S.SATURATED] == list(range(7))
    assert (S.NUM_COUNTS, S.MIN, S.MAX, S.ABSMAX, S.SUM, S.SUMSQ, S.COLS) == (7, 7, 8, 9, 10, 11, 12)
    assert f"kExpMin = {S.EXP_MIN};" in header and f"kExpMax = {S.EXP_MAX};" in header


def test_extension_backend_is_reported():
    b = torchhealth.backend()
    assert b.name == "extension" and "_C" in b.reason and "extension" in str(b)


def test_fallback_without_extension_warns_once_and_gives_the_same_rows():
    code = """
import sys, warnings
sys.modules["torchhealth._C"] = None  # makes `from . import _C` fail
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torchhealth
    import torchhealth._ops
import torch
assert torchhealth.backend().name == "reference", torchhealth.backend()
msgs = [str(x.message) for x in w if "torchhealth" in str(x.message)]
assert len(msgs) == 1 and "pure-PyTorch reference" in msgs[0] and "pip install" in msgs[0], msgs
x = torch.tensor([1.0, float("nan"), -3.0, 0.0]).half()
for bad, saturation, words in [(torch.arange(3), None, "tensors[1] has dtype torch.int64"),
                                (torch.ones(1), 0.0, "saturation must be a positive magnitude")]:
    try:
        torchhealth.tensor_stats([x, bad], saturation=saturation)
        raise SystemExit(f"no error for {words}")
    except (TypeError, ValueError) as e:
        assert words in str(e), e
print(torchhealth.tensor_stats([x, torch.ones(2, 2).t()]).data.tolist())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import torch
    x = torch.tensor([1.0, float("nan"), -3.0, 0.0]).half()
    want = torchhealth.tensor_stats([x, torch.ones(2, 2).t()]).data.tolist()
    assert eval(out.stdout) == want
