"""The Hugging Face Trainer with GaLoreTrainer equals the plain galore_ds loop on the same global
batches (1e-5), on one process and on 2 ranks (plain, DeepSpeed ZeRO-2 and 3), per-layer
and step-time, with gradient accumulation and clipping; resuming through the Trainer's own checkpoints is bit-identical;
its GaLore groups are the attention/MLP Linears by name; TrainingArguments' lr, betas, eps and
weight decay reach the optimizer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from hf_worker import reference, run_trainer  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402


TOL = 1e-5
WORKER = Path(__file__).parent / "dist" / "hf_worker.py"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


@pytest.mark.parametrize("layerwise,accum", [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_one_process_equals_the_plain_loop(tmp_path, layerwise, accum):
    job = dict(layerwise=layerwise, accum=accum, bs=2, steps=6, clip=1.0)
    weights, info = run_trainer(job, tmp_path)
    assert rel_diff(weights, reference(6, 2 * accum, 1.0)) < TOL
    if layerwise:  # the norm the per-layer optimizer clipped with, not the Trainer's (no gradients left)
        assert all(n is not None and n > 0 for n in info["grad_norms"]), info["grad_norms"]


def test_gradient_checkpointing_under_per_layer_updates_equals_the_plain_loop(tmp_path):
    # The Trainer's own gradient_checkpointing: layers recomputed inside backward, where the
    # per-layer hooks update the weights the recomputation reads only after it has run.
    job = dict(layerwise=True, accum=2, bs=2, steps=6, clip=1.0, checkpointing=True)
    weights, _ = run_trainer(job, tmp_path)
    assert rel_diff(weights, reference(6, 4, 1.0)) < TOL


def test_galore_groups_are_the_attention_and_mlp_linears_by_name(tmp_path):
    _, info = run_trainer(dict(layerwise=False, accum=1, bs=2, steps=1, clip=0.0), tmp_path)
    model = tiny_llama(vocab=96)
    expected = sorted(n for n, _ in model.named_parameters() if any(f".{x}." in n for x in LINEARS))
    assert sorted(info["groups"]["galore"]) == expected and len(expected) == 14
    full_rank = info["groups"]["decay"] + info["groups"]["no_decay"]
    assert "model.embed_tokens.weight" in full_rank and "lm_head.weight" in full_rank


def test_training_arguments_reach_the_optimizer(tmp_path):
    from transformers import TrainingArguments

    from galore_ds.integrations.hf import GaLoreArguments, GaLoreTrainer

    args = TrainingArguments(str(tmp_path), learning_rate=3e-3, adam_beta1=0.7, adam_beta2=0.9, adam_epsilon=1e-5,
                             weight_decay=0.05, use_cpu=True, report_to=[])
    trainer = GaLoreTrainer(model=tiny_llama(vocab=96), args=args, galore=GaLoreArguments(rank=8))
    opt = trainer.create_optimizer()
    for g in opt.param_groups:
        assert g["lr"] == 3e-3 and g["betas"] == (0.7, 0.9) and g["eps"] == 1e-5
        assert g["weight_decay"] == (0.0 if g["name"] == "no_decay" else 0.05)


@pytest.mark.parametrize("layerwise,accum", [(False, 1), (True, 2)])
def test_resume_through_trainer_checkpoints_is_bit_identical(tmp_path, layerwise, accum):
    job = dict(layerwise=layerwise, accum=accum, bs=2, steps=6, clip=1.0, save_steps=3)
    full, _ = run_trainer(job, tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file()
    resumed, _ = run_trainer({**job, "resume": str(ckpt)}, tmp_path / "resumed")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


@pytest.mark.slow
def test_two_ranks_equal_the_plain_loop_on_the_global_batch(tmp_path):
    """Per-layer (the optimizer averages projected gradients; no DDP) and step-time (DDP with
    the low-rank communication hook), both with accumulation 2 and clipping."""
    jobs = {"per_layer": dict(layerwise=True, accum=2, bs=2, steps=6, clip=1.0),
            "step_time": dict(layerwise=False, accum=2, bs=2, steps=6, clip=1.0)}
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(spec), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = reference(6, 2 * 2 * 2, 1.0)
    for name in jobs:
        weights = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert rel_diff(weights, ref) < TOL, name


@pytest.mark.slow
def test_two_ranks_under_deepspeed_equal_the_plain_loop_and_resume(tmp_path):
    """TrainingArguments(deepspeed=a ZeRO-2/3 config with "gradient_clipping": "auto" and no
    "optimizer" section) on 2 CPU ranks: the client optimizer on ZeRO's partitions, clipping only
    the optimizer's (DeepSpeed would clip the full gradients first), and ZeRO-2 resumed through
    the Trainer's checkpoint. (The Trainer's FSDP needs a GPU: on CPU Accelerate leaves it off;
    Accelerate's own FSDP2 path is tested on CPU in test_accelerate.py.)"""
    base = dict(layerwise=False, accum=2, bs=2, steps=6, clip=1.0)
    zero2 = {**base, "deepspeed": {"zero_optimization": {"stage": 2}}, "save_steps": 3}
    jobs = {"zero2": zero2,
            "zero3": {**base, "deepspeed": {"zero_optimization": {"stage": 3}}},
            "zero2_resumed": {**zero2, "resume": str(tmp_path / "zero2" / "checkpoint-3")}}
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(spec), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = reference(6, 2 * 2 * 2, 1.0)
    weights = {name: torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in jobs}
    layouts = {name: json.loads((tmp_path / f"{name}.json").read_text())["layout"] for name in jobs}
    assert layouts == {"zero2": "zero", "zero3": "zero", "zero2_resumed": "zero"}
    for name in ("zero2", "zero3"):
        assert rel_diff(weights[name], ref) < TOL, name
    for k in weights["zero2"]:
        assert torch.equal(weights["zero2"][k], weights["zero2_resumed"][k]), k
