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
from layerwise_cases import CASES as LAYERWISE_CASES  # noqa: E402
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


@pytest.mark.parametrize("layerwise,accum", [(False, 1), (True, 1), (True, 2)])
def test_delayed_clipping_equals_the_plain_loop(tmp_path, layerwise, accum):
    """GaLoreArguments(clip_timing="delayed"): each step clipped by the previous step's norm,
    step-time and per-layer (with accumulation too), equal to the plain loop's optimizer with
    clip_timing="delayed" (the norms here are about 2.5, over max_grad_norm 1.0)."""
    job = dict(layerwise=layerwise, accum=accum, bs=2, steps=6, clip=1.0, clip_timing="delayed")
    weights, info = run_trainer(job, tmp_path)
    assert rel_diff(weights, reference(6, 2 * accum, 1.0, clip_timing="delayed")) < TOL
    assert rel_diff(weights, reference(6, 2 * accum, 1.0)) > 100 * TOL  # not the exact-clipped run


# (optimizer, layerwise, accum, clip_timing, epochs): pairwise over optimizer x mode x timing,
# plus an epoch ending inside a window before the checkpoint
RESUME_ROWS = [("adamw", False, 1, "exact", None), ("adamw", True, 2, "exact", None),
               ("adamw", True, 1, "delayed", None), ("adamw8bit", False, 1, "delayed", None),
               ("adamw8bit", True, 2, "exact", None), ("adafactor", False, 2, "exact", None),
               ("adafactor", True, 2, "delayed", None), ("adamw", True, 2, "exact", 2)]


@pytest.mark.parametrize("optimizer,layerwise,accum,clip_timing,epochs", RESUME_ROWS)
def test_resume_through_trainer_checkpoints_is_bit_identical(tmp_path, optimizer, layerwise, accum, clip_timing,
                                                             epochs):
    job = dict(layerwise=layerwise, accum=accum, bs=2, steps=6, clip=1.0, save_steps=3, optimizer=optimizer,
               clip_timing=clip_timing)
    if epochs:  # 5 batches per epoch in windows of 2: checkpoint-4 is after epoch 1's partial window
        job = {**{k: v for k, v in job.items() if k != "steps"}, "epochs": epochs, "samples": 10, "save_steps": 4}
    full, _ = run_trainer(job, tmp_path / "full")
    ckpt = tmp_path / "full" / f"checkpoint-{job['save_steps']}"
    assert (ckpt / "optimizer.pt").is_file()
    resumed, _ = run_trainer({**job, "resume": str(ckpt)}, tmp_path / "resumed")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


TWO_RANK_JOBS = {
    "per_layer": dict(layerwise=True, accum=2, bs=2, steps=6, clip=1.0),
    "step_time": dict(layerwise=False, accum=2, bs=2, steps=6, clip=1.0),
    "per_layer_delayed": dict(layerwise=True, accum=1, bs=2, steps=6, clip=1.0, clip_timing="delayed"),
    "step_time_delayed": dict(layerwise=False, accum=1, bs=2, steps=6, clip=1.0, clip_timing="delayed"),
    # issue 21 #11: TrainingArguments' DDP options reach the Trainer's own DDP (low-rank hook)
    "ddp_options": dict(layerwise=False, accum=2, bs=2, steps=4, clip=1.0, unused_module=True,
                        ddp=dict(find_unused_parameters=True, bucket_cap_mb=1, broadcast_buffers=False)),
    **{name: {"case": name} for name in LAYERWISE_CASES},
}
_TWO_RANKS: dict = {}


def two_ranks(tmp_path_factory) -> Path:
    """One 2-rank launch of hf_worker.py for every job of TWO_RANK_JOBS (its output folder)."""
    if not _TWO_RANKS:
        out = tmp_path_factory.mktemp("hf2")
        spec = out / "jobs.json"
        spec.write_text(json.dumps(TWO_RANK_JOBS))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(spec), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        _TWO_RANKS.update(out=out, returncode=done.returncode, log=done.stderr[-3000:])  # launched once, even failing
    assert _TWO_RANKS["returncode"] == 0, _TWO_RANKS["log"]
    return _TWO_RANKS["out"]


@pytest.mark.slow
def test_two_ranks_equal_the_plain_loop_on_the_global_batch(tmp_path_factory):
    """Per-layer (the optimizer averages projected gradients; no DDP) and step-time (DDP with
    the low-rank communication hook), both with accumulation 2 and exact clipping, and both
    with delayed clipping (norms about 2.5, max_grad_norm 1.0: every step clipped)."""
    out = two_ranks(tmp_path_factory)
    for names, ref in ((("per_layer", "step_time"), reference(6, 2 * 2 * 2, 1.0)),
                       (("per_layer_delayed", "step_time_delayed"), reference(6, 2 * 2, 1.0, clip_timing="delayed"))):
        for name in names:
            weights = torch.load(out / f"{name}.pt", weights_only=True)
            assert rel_diff(weights, ref) < TOL, name


@pytest.mark.slow
def test_the_trainers_ddp_takes_the_training_arguments_ddp_options(tmp_path_factory):
    """issue 21 #11: a model with a module forward never uses and ddp_find_unused_parameters=True
    failed in DDP ("pass find_unused_parameters=True"): GaLoreTrainer built DDP(model) with no
    arguments. It now passes what Accelerate passes (find_unused_parameters, bucket_cap_mb,
    broadcast_buffers, static_graph from TrainingArguments) and equals the plain loop."""
    out = two_ranks(tmp_path_factory)
    info = json.loads((out / "ddp_options.json").read_text())
    assert info["ddp"] == {"find_unused_parameters": True, "broadcast_buffers": False, "bucket_bytes_cap": 2**20,
                           "static_graph": False, "gradient_as_bucket_view": False}, info["ddp"]
    weights = torch.load(out / "ddp_options.pt", weights_only=True)
    assert rel_diff(weights, reference(4, 2 * 2 * 2, 1.0)) < TOL
    assert torch.equal(weights["unused.weight"], _unused_init()["unused.weight"])


def _unused_init() -> dict[str, torch.Tensor]:
    model = tiny_llama(vocab=96, seed=0)
    model.unused = torch.nn.Linear(4, 4)
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LAYERWISE_CASES))
def test_per_layer_wrapper_on_two_ranks(case, tmp_path_factory):
    """tests/dist/layerwise_cases.py (issue 21 #8 and the per-layer enumeration), run in the
    same launch."""
    ranks = json.loads((two_ranks(tmp_path_factory) / f"{case}.json").read_text())["ranks"]
    for rank, r in enumerate(ranks):
        assert r["ok"], f"rank {rank}: {r.get('error')}\n{r.get('trace')}"


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


@pytest.mark.parametrize("layerwise", [False, True])
def test_an_epoch_that_ends_inside_an_accumulation_window_steps_on_the_partial_window(tmp_path, layerwise):
    """issue 21 #10: 5 batches per epoch with gradient_accumulation_steps=2, 2 epochs: the
    Trainer (transformers 5.23) steps at each epoch's end on a window of 1 batch, its loss the
    mean over that window's tokens (num_items_in_batch). Per-layer mode closes the partial
    window there (it crashed: "the Trainer stepped inside an accumulation window"); both modes
    equal the plain loop whose every third step takes the 2 samples left (1e-5)."""
    job = dict(layerwise=layerwise, accum=2, bs=2, epochs=2, samples=10, clip=1.0)
    weights, info = run_trainer(job, tmp_path)
    assert len(info["grad_norms"]) == 6
    assert rel_diff(weights, reference(6, 4, 1.0, epoch_samples=10)) < TOL
