"""Accelerate: `accelerator.prepare(model, galore_optimizer)` under DDP, under the FSDP2 plugin
(the optimizer built before fully_shard, its parameters swapped for the sharded ones) and under
the DeepSpeed plugin (ZeRO-2, the client optimizer on its partitions) trains as the one-process galore_ds loop on the same global batches (1e-5); Accelerate's
silent swap to DeepSpeedCPUAdam under ZeRO offload is refused with one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from hf_worker import reference  # noqa: E402

WORKER = Path(__file__).parent / "dist" / "accelerate_worker.py"


@pytest.mark.slow
def test_prepare_under_ddp_fsdp2_and_deepspeed_equals_the_plain_loop(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = reference(6, 2 * 2 * 2, 1.0)
    for kind in ("ddp", "fsdp2", "deepspeed"):
        weights = torch.load(tmp_path / f"{kind}.pt", weights_only=True)
        diff = max(float((weights[k] - ref[k]).norm() / ref[k].norm()) for k in ref)
        assert diff < 1e-5, (kind, diff)


OFFLOAD_SWAP = r"""
import sys, torch, deepspeed
sys.path.insert(0, sys.argv[1])
import galore_ds, galore_ds.integrations.deepspeed as gds
from tiny_models import tiny_llama
gds.register()
model = tiny_llama(vocab=96)
galore = galore_ds.GaLoreAdamW(galore_ds.param_groups(model, rank=8), lr=1e-3)
swapped = torch.optim.Adam(galore.param_groups, lr=1e-3)  # the swap's result, minus its C++ op
try:
    deepspeed.initialize(model=model, optimizer=swapped,
                         config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}})
except ValueError as e:
    print("REFUSED:", e)
"""


def test_offload_swap_to_another_optimizer_is_refused_in_one_line(tmp_path):
    """Accelerate's map_pytorch_optim_to_deepspeed builds DeepSpeedCPUAdam(optimizer.param_groups,
    ...) when the DeepSpeed config offloads the optimizer, and hands DeepSpeed that instead."""
    from netutil import free_port

    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", OFFLOAD_SWAP, str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    lines = [x for x in done.stdout.splitlines() if x.startswith("REFUSED:")]
    assert len(lines) == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert "offload_optimizer" in lines[0] and "Adam" in lines[0]
