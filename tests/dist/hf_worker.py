"""The Hugging Face Trainer with galore_ds's GaLoreTrainer, as a user runs it: one process
(called in-process by the tests) or several under torchrun (`python hf_worker.py SPEC OUT`:
every job of SPEC in one launch, rank 0 saves each job's final weights; a job {"case": name}
runs a per-layer case of layerwise_cases.py in the same process group).

The data is a fixed list of token sequences read in order (train_sampling_strategy
"sequential"), so the reference loop in tests/test_hf_trainer.py can take the same global
batches: step s covers samples [s*G, (s+1)*G) with G = per-device batch x accumulation x ranks.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from tiny_models import tiny_llama  # noqa: E402

warnings.filterwarnings("ignore")
VOCAB, SEQ = 96, 16
RECIPE = dict(rank=8, update_proj_gap=2, lr=1e-2, warmup=1, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-7)


def samples(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (SEQ,), generator=g) for _ in range(n)]


def reference(steps: int, global_batch: int, clip: float, epoch_samples: int | None = None,
              clip_timing: str = "exact") -> dict[str, torch.Tensor]:
    """The plain galore_ds loop a user writes: one process, the whole global batch per step,
    the Trainer's cosine schedule. With `epoch_samples`, the data is that many samples read
    again every epoch, and an epoch's last step takes what is left (the Trainer's partial
    accumulation window: the mean over fewer samples)."""
    from transformers import get_scheduler

    import galore_ds

    r = RECIPE
    model = tiny_llama(vocab=VOCAB, seed=0)
    groups = galore_ds.param_groups(model, rank=r["rank"], update_proj_gap=r["update_proj_gap"],
                                    weight_decay=r["weight_decay"])
    opt = galore_ds.GaLoreAdamW(groups, lr=r["lr"], betas=r["betas"], eps=r["eps"],
                                weight_decay=r["weight_decay"], max_grad_norm=clip or None, clip_timing=clip_timing)
    sched = get_scheduler("cosine", opt, num_warmup_steps=r["warmup"], num_training_steps=steps)
    if epoch_samples is None:
        data = samples(steps * global_batch)
        windows = [data[s * global_batch:(s + 1) * global_batch] for s in range(steps)]
    else:
        data = samples(epoch_samples)
        epoch = [data[i:i + global_batch] for i in range(0, epoch_samples, global_batch)]
        windows = (epoch * steps)[:steps]
    for s in range(steps):
        x = torch.stack(windows[s])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in model.named_parameters()}


def run_trainer(job: dict, out_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """One GaLoreTrainer run; `job`: layerwise, accum, bs, steps (or epochs over samples), clip,
    clip_timing, optimizer, save_steps, resume, checkpointing (TrainingArguments.gradient_checkpointing),
    unused_module, ddp (TrainingArguments' ddp_* options),
    and for GPU runs (benchmarks/gpu_integrations.py) cuda, fsdp2, deepspeed (a config dict)."""
    from transformers import TrainingArguments

    from galore_ds.integrations.hf import GaLoreArguments, GaLoreTrainer

    model = tiny_llama(vocab=VOCAB, seed=0)
    if job.get("unused_module"):  # a module forward never reaches: DDP needs find_unused_parameters
        model.unused = torch.nn.Linear(4, 4)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # "epochs": that many passes over "samples" samples (an epoch may end inside a window)
    n = job.get("samples") or job["steps"] * job["bs"] * job["accum"] * world
    data = [{"input_ids": x, "labels": x} for x in samples(n)]
    r = RECIPE
    args = TrainingArguments(
        str(out_dir), per_device_train_batch_size=job["bs"], gradient_accumulation_steps=job["accum"],
        max_steps=job.get("steps", -1), num_train_epochs=job.get("epochs", 1), learning_rate=r["lr"],
        lr_scheduler_type="cosine", warmup_steps=r["warmup"],
        weight_decay=r["weight_decay"], adam_beta1=r["betas"][0], adam_beta2=r["betas"][1], adam_epsilon=r["eps"],
        max_grad_norm=job["clip"], save_strategy="steps", save_steps=job.get("save_steps", 10_000),
        logging_steps=1, report_to=[], seed=0, train_sampling_strategy="sequential",
        disable_tqdm=True, dataloader_drop_last=True, gradient_checkpointing=job.get("checkpointing", False),
        **{f"ddp_{k}": v for k, v in job.get("ddp", {}).items()}, **engine_arguments(job))
    galore = GaLoreArguments(rank=r["rank"], update_proj_gap=r["update_proj_gap"], layerwise=job["layerwise"],
                             optimizer=job.get("optimizer", "adamw"), clip_timing=job.get("clip_timing", "exact"))
    trainer = GaLoreTrainer(model=model, args=args, train_dataset=data, galore=galore)
    trainer.train(resume_from_checkpoint=job.get("resume"))
    groups = {g.get("name"): g["param_names"] for g in trainer._galore_optimizer.param_groups}
    logs = [x for x in trainer.state.log_history if "loss" in x]
    weights = full_weights(trainer)
    params = list(trainer.accelerator.unwrap_model(trainer.model).parameters())
    layout = ("dtensor" if any(hasattr(p, "placements") for p in params) else
              "zero" if trainer.is_deepspeed_enabled else "plain")
    ddp = trainer.model_wrapped
    ddp_options = ({k: getattr(ddp, k) for k in ("find_unused_parameters", "broadcast_buffers", "bucket_bytes_cap",
                                                  "static_graph", "gradient_as_bucket_view")}
                   if isinstance(ddp, torch.nn.parallel.DistributedDataParallel) else None)
    return weights, {"groups": groups, "grad_norms": [x.get("grad_norm") for x in logs], "layout": layout,
                     "ddp": ddp_options}


def engine_arguments(job: dict) -> dict:
    """TrainingArguments for the engines only a GPU runs: FSDP2 (Accelerate's fully_shard
    path) and DeepSpeed (a ZeRO config with no "optimizer" section: the client optimizer)."""
    cuda = job.get("cuda", False)
    out: dict = {"use_cpu": not cuda}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        out["ddp_backend"] = "nccl" if cuda else "gloo"
    if job.get("fsdp2"):
        out.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2,
                                                   "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    if job.get("deepspeed"):
        out["deepspeed"] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                            "gradient_clipping": "auto", **job["deepspeed"]}
    return out


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """Every parameter whole, on CPU: DTensors gathered, ZeRO-3 partitions gathered."""
    model = trainer.accelerator.unwrap_model(trainer.model)  # the Trainer keeps the user's module here
    if trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.detach().float().cpu().clone() for k, v in model.named_parameters()}
    out = {}
    for k, v in model.named_parameters():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k.removeprefix("module.")] = v.detach().float().cpu().clone()
    return out


def run_case(name: str, out: Path) -> None:
    """A job {"case": name}: tests/dist/layerwise_cases.py's case `name` in this process group;
    rank 0 writes every rank's result (ok, error) to OUT/name.json."""
    import traceback

    import torch.distributed as dist

    from layerwise_cases import CASES

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        result = {"ok": True, **(CASES[name](dist.get_world_size()) or {})}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps({"ranks": gathered}, default=str))


def main() -> None:
    jobs, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    for name, job in jobs.items():
        if "case" in job:
            run_case(job["case"], out)
            continue
        weights, info = run_trainer(job, out / name)
        if rank == 0:
            torch.save(weights, out / f"{name}.pt")
            (out / f"{name}.json").write_text(json.dumps(info))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the jobs' models and optimizers still hold the process group: leave without an
        # interpreter teardown that can abort inside gloo (tests/dist/shutdown.py)
        from shutdown import exit_worker

        exit_worker()


if __name__ == "__main__":
    main()
