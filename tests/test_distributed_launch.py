"""examples/train_fsdp2.py launched as users launch it: two torchrun "nodes" on
this machine meeting at a c10d rendezvous on 127.0.0.1, one process each."""
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from dist_workers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_two_nodes_skip_the_poisoned_step_and_name_its_rank():
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
         "--rdzv_id", f"torchhealth-test-{port}", os.path.join(ROOT, "examples", "train_fsdp2.py"),
         "--steps", "4", "--nan-at", "2", "--batch", "2", "--seq", "8"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)]
    outputs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(outputs)
    lines = [line for out in outputs for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 4, "\n".join(outputs)
    for i, line in enumerate(lines):
        assert (f"skipped {i == 2}" in line), line
    assert "non-finite gradients from ranks [1]" in lines[2], lines[2]
    assert "non-finite" not in lines[3]
