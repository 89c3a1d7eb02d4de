"""The train loop. Reads top to bottom: data, model, engine, resume, loop, final save.

Everything distributed happens inside the engine; this file only decides what to run when."""
from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from galore_ds.train.config import Config, DistEnv
from galore_ds.train.data import StepLoader, build_datasets, build_streaming, eval_batches
from galore_ds.train.model import build_model, num_params, use_meta
from galore_ds.layouts.comm import COMM
from galore_ds.train import checkpoint, faults
from galore_ds.train.engines.base import Engine, make_engine
from galore_ds.train.metrics import MetricsLogger


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config, dist: DistEnv, engine: Optional[Engine] = None) -> dict[str, Any]:
    """Run the recipe; returns a summary (first/last loss, eval, wall time)."""
    t, lg = cfg.training, cfg.logging
    seed_everything(t.seed)
    is_main = dist.rank == 0

    # ---- data -------------------------------------------------------------------------------
    with faults.data_errors(cfg):  # unreadable / empty / too small data: one-line error, exit 2
        if cfg.data.streamed:  # tokenized and packed while training (C4-sized sources)
            tok, loader, eval_ds = build_streaming(cfg.data, cfg.model.vocab_size, t.global_batch, t.micro_batch,
                                                   t.eval_batches, dist.rank, dist.world_size)
            train_desc = "streamed"
        else:
            tok, train_ds, eval_ds = build_datasets(cfg.data, cfg.model.vocab_size)
            loader = StepLoader(train_ds, t.global_batch, t.micro_batch, dist.rank, dist.world_size, cfg.data.seed)
            train_desc = str(len(train_ds))
    evals = eval_batches(eval_ds, t.eval_batches, t.micro_batch, dist.rank, dist.world_size)

    # ---- model + engine ---------------------------------------------------------------------
    engine = engine or make_engine(cfg, dist)
    meta = engine.wants_meta_model and use_meta(cfg.model)
    engine.setup(build_model(cfg.model, seed=t.seed, meta=meta))

    # ---- resume -----------------------------------------------------------------------------
    ckpt_root, start_step, resume_s = cfg.checkpoint_dir, 0, None
    if cfg.checkpoint.resume:
        found = checkpoint.resolve(ckpt_root, cfg.checkpoint.resume)
        if found is not None:
            faults.check_resume(found, cfg)  # incomplete, or another model's: one-line error, exit 2
            started = time.perf_counter()
            with faults.load_errors(found):
                state = checkpoint.load(found, engine)
            resume_s = time.perf_counter() - started
            engine.apply_recipe()  # lr, schedule, betas, decay, clip: this recipe's (docs/resume.md)
            start_step = int(state["step"])
            loader.load_state_dict(state["data"])
        elif is_main:
            print(f"checkpoint.resume: no checkpoint under {ckpt_root}; starting from step 0", flush=True)

    run_dir = Path(lg.run_dir)
    log = MetricsLogger(run_dir, is_main, t.steps, start_step, lg.progress_bar, tensorboard=lg.tensorboard,
                        wandb=lg.wandb, wandb_project=lg.wandb_project, config=cfg.to_dict())
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log.write(f"{cfg.name}: {num_params(cfg.model) / 1e6:.2f}M params, engine={engine.name}, "
                  f"world={dist.world_size}, accumulation={cfg.accumulation(dist.world_size)}, "
                  f"train={train_desc} x {cfg.data.seq_len} tokens, eval={len(eval_ds)} seqs, "
                  f"vocab={tok.vocab_size}")
    if resume_s is not None:
        log.log({"step": start_step, "resume_s": resume_s})

    def save(step: int) -> Path:
        state = {"step": step, "data": loader.state_dict(), "config": json.dumps(cfg.to_dict())}
        started = time.perf_counter()
        path = checkpoint.save(ckpt_root, step, engine, state, cfg.checkpoint.keep_last)
        log.log({"step": step, "checkpoint_s": time.perf_counter() - started})
        log.write(f"saved checkpoint {path}")
        return path

    def evaluate(step: int) -> float:
        loss = engine.eval_loss(evals)
        ppl = math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan
        log.log({"step": step, "eval_loss": loss, "eval_ppl": ppl})
        log.write(f"step {step}: eval loss {loss:.4f}, ppl {ppl:.2f}")
        return loss

    # ---- loop -------------------------------------------------------------------------------
    # Ctrl-C: finish the current step, save, exit (a half-done step is never saved).
    # A second Ctrl-C aborts at once without saving.
    stop = {"flag": False}
    def on_sigint(signum, frame):  # noqa: ANN001
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
    # SIGTERM (cluster preemption, `kill`) is treated like Ctrl-C: save, then exit.
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
        old_handlers = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}

    tokens_per_step = t.global_batch * cfg.data.seq_len
    first_loss = last_loss = math.nan
    eval_loss = math.nan
    t0 = time.perf_counter()
    step = start_step
    interrupted = False
    try:
        while step < t.steps:
            ts = time.perf_counter()
            sent_before = COMM.total_bytes()  # galore_ds records each collective it issues
            out = engine.train_step(loader.next_step())
            step += 1
            dt = time.perf_counter() - ts
            if math.isnan(first_loss):
                first_loss = out.loss
            last_loss = out.loss
            if step % lg.log_every == 0 or step == t.steps:
                rec = {"step": step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
                       "comm_bytes": COMM.total_bytes() - sent_before,
                       "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / dt,
                       "elapsed_s": time.perf_counter() - t0, "epoch": loader.epoch,
                       **engine.memory_stats(), **out.extra, **engine.galore_stats()}
                log.log(rec)
            log.progress(1, {"loss": f"{out.loss:.3f}", "lr": f"{out.lr:.2e}", "gnorm": f"{out.grad_norm:.2f}",
                             "tok/s": f"{tokens_per_step / dt:.0f}",
                             "mem": f"{engine.memory_stats().get('mem_gb', 0):.2f}G"})
            if t.eval_batches and t.eval_every and step % t.eval_every == 0 and step < t.steps:
                eval_loss = evaluate(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t.steps:
                save(step)
            # rank 0's flag decides, so every rank stops after the same step
            flag = engine.broadcast_object(stop["flag"]) if dist.world_size > 1 else stop["flag"]
            if flag:
                interrupted = True
                break
    except KeyboardInterrupt:
        # Second Ctrl-C: a step may be half applied, so nothing is saved; the last checkpoint stands.
        log.write("second Ctrl-C: exiting without saving")
        log.close()
        raise
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    if interrupted:
        log.write(f"interrupted at step {step}: saving")
        save(step)
    else:
        if t.eval_batches:
            eval_loss = evaluate(step)
        if cfg.checkpoint.save_final:
            save(step)
    wall = time.perf_counter() - t0
    log.close()
    return {"first_loss": first_loss, "last_loss": last_loss, "eval_loss": eval_loss, "step": step,
            "wall_s": wall, "interrupted": interrupted}
