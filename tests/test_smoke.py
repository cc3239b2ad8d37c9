import torch
import torchhealth
from torchhealth import reference


def test_matches_reference_on_specials(dtype):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.5, -3.0, 1e-30],
                     dtype=torch.float64).to(dtype)
    got = torchhealth.tensor_stats([x]).data
    want = reference.tensor_stats([x])
    assert torch.equal(got[:, :7], want[:, :7])
    assert torch.equal(got[:, 12:], want[:, 12:])
    assert torch.equal(got[:, 7:10], want[:, 7:10])
