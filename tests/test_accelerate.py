"""Accelerate: `accelerator.prepare(model, galore_optimizer)` under DDP, under the FSDP2 plugin
(the optimizer built before fully_shard, its parameters swapped for the sharded ones) and under
the DeepSpeed plugin (ZeRO-2, the client optimizer on its partitions) trains as the one-process
galore_ds loop on the same global batches (1e-5), with the optimizer's clipping and with
`accelerator.clip_grad_norm_`; `accelerator.save_state`/`load_state` (DDP, DeepSpeed plugin) x
the three optimizers x clip timing resume bit-identically; Accelerate's silent swap to
DeepSpeedCPUAdam under ZeRO offload is refused with one line. One torchrun launch runs every job."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from accelerate_worker import RESUME_FACTORS, RESUMES, reference_accelerator_clip  # noqa: E402
from hf_worker import reference  # noqa: E402

WORKER = Path(__file__).parent / "dist" / "accelerate_worker.py"
FORMS = ("ddp", "fsdp2", "deepspeed")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Path:
    """Every job of accelerate_worker.py in one 2-rank torchrun launch; rank 0's weight files."""
    out = tmp_path_factory.mktemp("accelerate")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _rel(weights: dict, ref: dict) -> float:
    return max(float((weights[k] - ref[k]).norm() / ref[k].norm()) for k in ref)


@pytest.mark.slow
def test_prepare_under_ddp_fsdp2_and_deepspeed_equals_the_plain_loop(jobs):
    ref = reference(6, 2 * 2 * 2, 1.0)
    for kind in FORMS:
        diff = _rel(torch.load(jobs / f"{kind}.pt", weights_only=True), ref)
        assert diff < 1e-5, (kind, diff)


@pytest.mark.slow
def test_accelerator_clip_grad_norm_equals_the_plain_loop_with_clip_grad_norm(jobs):
    """`accelerator.clip_grad_norm_(model.parameters(), c)` before `opt.step()` (the optimizer
    without max_grad_norm) equals one process calling torch.nn.utils.clip_grad_norm_: under DDP
    on the averaged gradients, under FSDP2 on the DTensor shards (norm over the whole model);
    under the DeepSpeed plugin the call only reads the norm and DeepSpeed clips the full
    gradient from the plugin's gradient_clipping (Accelerate's documented behaviour)."""
    ref = reference_accelerator_clip(6, 2 * 2 * 2)
    unclipped = reference(6, 2 * 2 * 2, 0.0)
    assert _rel(unclipped, ref) > 1e-3   # the clip binds: the comparison can tell
    for kind in FORMS:
        diff = _rel(torch.load(jobs / f"{kind}_accelerator_clip.pt", weights_only=True), ref)
        assert diff < 1e-5, (kind, diff)


def test_resume_jobs_cover_every_pair_of_form_optimizer_and_clipping():
    import pairwise

    cases = [dict(zip(RESUME_FACTORS, r)) for r in RESUMES]
    assert pairwise.uncovered(RESUME_FACTORS, cases) == [] and len(cases) <= 9


@pytest.mark.slow
@pytest.mark.parametrize("kind,opt,clip", RESUMES)
def test_save_state_load_state_resumes_bit_identically(jobs, kind, opt, clip):
    """accelerator.save_state after step 3 of 6; a fresh Accelerator, model and optimizer
    load_state it and take steps 3-5: the same weights bit for bit, and delayed clipping's
    carried coefficient comes back as saved."""
    got = torch.load(jobs / f"resume_{kind}_{opt}_{clip}.pt", weights_only=True)
    a, b = got["uninterrupted"], got["resumed"]
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff == 0.0, diff
    saved, loaded = got["coef"].tolist()
    assert saved == loaded, (saved, loaded)
    if clip == "delayed":
        assert saved < 1.0, saved   # a real carried coefficient, not the initial 1.0


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
