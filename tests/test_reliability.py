"""Numerical faults and torn checkpoints lose nothing.

- A NaN or Inf gradient skips the whole step: weights, optimizer moments, projectors, the
  optimizer's step count and the LR schedule are bit-for-bit unchanged, the skip is counted in
  metrics.jsonl, and a run with a skipped step equals a run that never saw that batch.
- An SVD that fails in fp32 is retried in fp64; one that fails in both keeps the previous
  projector, is counted, and training continues with finite weights.
- Checkpoints are atomic: 20+ SIGKILLs, each landing at a random moment inside a save, always
  leave `latest` resolving to a complete, loadable checkpoint at least as new as the last save
  that finished, never a half-written step-* directory; the run, restarted from `latest` after
  every kill, ends with the same weights and optimizer state, bit for bit, as an uninterrupted run.
"""
from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from galore_ds.train.config import DistEnv, from_dict, validate
from galore_ds.train.data import StepLoader, build_datasets
from galore_ds.train.model import build_model
from galore_ds.train import checkpoint, faults
from galore_ds.train.engines.layerwise import LayerwiseEngine
from galore_ds.train.engines.single import SingleEngine
from galore_ds.train.trainer import train
from netutil import launcher_env
from recipes import flat, tiny_cfg, tiny_recipe


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def make_cfg(tmp_path, cache_dir, **over):
    return tiny_cfg(tmp_path, cache_dir, name="rel", **{"training__eval_batches": 1, **over})


def same(a, b) -> bool:
    ta, tb = list(flat(a)), list(flat(b))
    return len(ta) == len(tb) > 0 and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def engine_state(e: SingleEngine) -> dict:
    return copy.deepcopy({"model": e.model.state_dict(), "optimizer": e.optimizer.state_dict(),
                          "scheduler": e.scheduler.state_dict()})


def new_engine(cfg, cls=SingleEngine) -> SingleEngine:
    e = cls(cfg, DistEnv())
    e.setup(build_model(cfg.model, seed=cfg.training.seed))
    return e


def batches(cfg, n):
    _, ds, _ = build_datasets(cfg.data, cfg.model.vocab_size)
    loader = StepLoader(ds, cfg.training.global_batch, cfg.training.micro_batch, 0, 1)
    return [loader.next_step() for _ in range(n)]


class poison:
    """Makes one parameter's gradient NaN or Inf during the next backward."""

    def __init__(self, engine: SingleEngine, value: float) -> None:
        self.p = dict(engine.model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
        self.value = value

    def __enter__(self):
        self.h = self.p.register_hook(lambda g: g.clone().index_fill_(0, torch.tensor([0]), self.value))
        return self

    def __exit__(self, *exc):
        self.h.remove()


# ------------------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("engine_cls,at", [(SingleEngine, 3), (LayerwiseEngine, 3), (LayerwiseEngine, 2)],
                         ids=["single", "layerwise", "layerwise-refresh-step"])
def test_nonfinite_gradient_skips_the_whole_step(tmp_path, cache_dir, value, engine_cls, at):
    # The per-layer engine (the one-rank default) defers its updates to the end of backward
    # (clipping and 2 micro-batches here), so it can drop the step whole; at a refresh step
    # (gap 2: steps 0, 2, 4) it also puts the projectors it already replaced back.
    cfg = make_cfg(tmp_path, cache_dir)
    steps = batches(cfg, at + 2)
    a, b = new_engine(cfg, engine_cls), new_engine(cfg, engine_cls)
    for mbs in steps[:at]:
        a.train_step(mbs)
        b.train_step(mbs)
    before = engine_state(a)
    assert any("proj" in s for s in before["optimizer"]["state"].values())
    with poison(a, value):
        out = a.train_step(steps[at])
    assert not math.isfinite(out.grad_norm)
    assert out.extra["skipped_steps"] == 1 and a.galore_stats()["skipped_steps"] == 1
    after = engine_state(a)
    assert same(before["model"], after["model"]), "weights changed on a skipped step"
    assert same(before["optimizer"], after["optimizer"]), "moments/projectors/step changed on a skipped step"
    assert before["scheduler"]["last_epoch"] == after["scheduler"]["last_epoch"] == at
    assert all(p.grad is None for p in a.model.parameters()), "poisoned gradients left behind"
    # The skipped step is exactly "this batch never happened": the next step matches b's.
    a.train_step(steps[at + 1])
    b.train_step(steps[at + 1])
    assert same(engine_state(a), engine_state(b))
    assert all(torch.isfinite(p).all() for p in a.model.parameters())


class NaNAt(SingleEngine):
    """Poisons the gradient of loop step `at` (1-based)."""
    at = 3

    def train_step(self, micro_batches):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.at:
            with poison(self, math.nan):
                return super().train_step(micro_batches)
        return super().train_step(micro_batches)


def test_skipped_step_is_counted_in_metrics_and_checkpoint(tmp_path, cache_dir):
    cfg = make_cfg(tmp_path, cache_dir)
    out = train(cfg, DistEnv(), NaNAt(cfg, DistEnv()))
    assert out["step"] == 6
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert rows[2]["grad_norm"] is None  # non-finite norms are logged as null
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
    sd = torch.load(tmp_path / "ckpt" / "step-0000006" / "engine.pt", weights_only=True)
    assert sd["scheduler"]["last_epoch"] == 5  # 6 batches, 5 optimizer steps
    assert all(s["step"] == 5 for s in sd["optimizer"]["state"].values() if "step" in s)
    assert all(torch.isfinite(t).all() for t in sd["model"].values())


# ------------------------------------------------------------------------------ SVD faults
def _svd_fails(dtypes):
    real = torch.linalg.svd
    calls = {"n": 0}

    def svd(a, *args, **kw):
        calls["n"] += 1
        if a.dtype in dtypes:
            raise torch._C._LinAlgError("linalg.svd: (Batch element 0): The algorithm failed to converge")
        return real(a, *args, **kw)
    return svd, calls


def test_svd_failure_in_fp32_is_retried_in_fp64(tmp_path, cache_dir, monkeypatch):
    cfg = make_cfg(tmp_path, cache_dir)
    e = new_engine(cfg)
    svd, calls = _svd_fails({torch.float32})
    monkeypatch.setattr(torch.linalg, "svd", svd)
    for mbs in batches(cfg, 3):
        e.train_step(mbs)
    st = e.galore_stats()
    assert calls["n"] > 0 and st["refreshes"] > 0 and st["svd_failures"] == 0
    assert all(torch.isfinite(p).all() for p in e.model.parameters())


def test_svd_failure_keeps_previous_projector_and_training_continues(tmp_path, cache_dir, monkeypatch):
    cfg = make_cfg(tmp_path, cache_dir)
    steps = batches(cfg, 6)
    e = new_engine(cfg)
    for mbs in steps[:3]:  # refreshes at optimizer steps 0 and 2 succeed
        e.train_step(mbs)
    projs = {k: s["proj"].clone() for k, s in e.optimizer.state_dict()["state"].items() if "proj" in s}
    assert projs and e.galore_stats()["svd_failures"] == 0
    svd, calls = _svd_fails({torch.float32, torch.float64})
    monkeypatch.setattr(torch.linalg, "svd", svd)
    w0 = [p.detach().clone() for p in e.model.parameters()]
    losses = [e.train_step(mbs).loss for mbs in steps[3:]]  # step 4 refreshes: every SVD fails
    st = e.galore_stats()
    assert calls["n"] > 0 and st["svd_failures"] == len(projs)
    now = {k: s["proj"] for k, s in e.optimizer.state_dict()["state"].items() if "proj" in s}
    assert all(torch.equal(projs[k], now[k]) for k in projs), "a failed SVD changed a projector"
    assert all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(p).all() for p in e.model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(w0, e.model.parameters())), "training stopped"
    assert e.scheduler.last_epoch == 6


# ------------------------------------------------------------------ durable checkpoints
def test_checkpoint_reaches_the_disk_before_it_is_named_complete(tmp_path, cache_dir, monkeypatch):
    """A power loss must not leave a renamed (complete-looking) directory with unwritten pages:
    every file and directory is fsynced under its .tmp name before the rename, and the
    checkpoint root (holding the renames and `latest`) after it."""
    e = new_engine(make_cfg(tmp_path, cache_dir))
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    root = tmp_path / "durable"
    final = checkpoint.save(root, 1, e, {"step": 1})
    tmp = root / ".tmp-step-0000001"
    rename = events.index(("replace", str(tmp), str(final)))
    synced_before = {ev[1] for ev in events[:rename] if ev[0] == "fsync"}
    contents = [tmp / p.relative_to(final) for p in final.rglob("*")]
    assert contents and all(str(p) in synced_before for p in contents + [tmp]), (contents, synced_before)
    assert ("fsync", str(root)) in events[rename:]
    assert (root / "latest").read_text().strip() == final.name


# ------------------------------------------------------------------ SIGKILL during saves
TRIALS = 20


def _child(cfg_dict: dict, fd: int) -> None:
    """One training process: resumes from latest, saves every step, tells the parent when each
    save starts ("S <step>") and ends ("E <step>")."""
    real_save = checkpoint.save

    def save(root, step, engine, state, keep_last=0):
        os.write(fd, f"S {step}\n".encode())
        t0 = time.perf_counter()
        out = real_save(root, step, engine, state, keep_last)
        os.write(fd, f"E {step} {time.perf_counter() - t0:.6f}\n".encode())
        return out

    checkpoint.save = save
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        train(validate(from_dict(cfg_dict), DistEnv()), DistEnv())
    os.write(fd, b"DONE\n")


def _read_events(fd: int, buf: bytearray, want: int, timeout: float) -> list[str]:
    """Read lines until `want` lines are buffered or the timeout passes."""
    import select

    end = time.monotonic() + timeout
    while buf.count(b"\n") < want and time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf.extend(chunk)
    return buf.decode().splitlines()


def _check_complete(step_path: Path) -> None:
    for name in ("engine.pt", "trainer.pt", "rng-rank0.pt"):
        torch.load(step_path / name, weights_only=True)  # raises on a torn file


def test_sigkill_during_saves_never_tears_a_checkpoint_and_resume_is_exact(tmp_path, cache_dir):
    steps = 60
    over = dict(training__steps=steps, galore__update_proj_gap=3, checkpoint__every=1, checkpoint__keep_last=2,
                checkpoint__resume="latest", training__eval_batches=0, training__eval_every=0,
                data__eval_fraction=0.02)
    cfg = make_cfg(tmp_path / "killed", cache_dir, **over)
    ref = make_cfg(tmp_path / "ref", cache_dir, **{**over, "checkpoint__every": 0, "checkpoint__resume": None})
    build_datasets(cfg.data, cfg.model.vocab_size)  # warm the tokenizer/token cache before forking
    ctx = mp.get_context("fork")
    rng = random.Random(7)
    root = cfg.checkpoint_dir
    mid_save, save_s, last_done = 0, [], 0
    for trial in range(TRIALS):
        r, w = os.pipe()
        proc = ctx.Process(target=_child, args=(cfg.to_dict(), w))
        proc.start()
        os.close(w)
        buf = bytearray()
        k = rng.randint(1, 2)  # kill inside the k-th save of this process
        events = _read_events(r, buf, 2 * k - 1, 60)
        assert events and events[-1].startswith("S"), f"trial {trial}: child did not reach a save: {events}"
        est = sorted(save_s)[len(save_s) // 2] if save_s else 0.01  # median length of a save
        time.sleep(rng.uniform(0, est))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        events = _read_events(r, buf, 10**6, 0.05)
        os.close(r)
        save_s += [float(e.split()[2]) for e in events if e.startswith("E")]
        mid_save += events[-1].startswith("S")
        done = [int(e.split()[1]) for e in events if e.startswith("E")]
        started = int([e for e in events if e.startswith("S")][-1].split()[1])
        last_done = max([last_done, *done])
        # the latest complete checkpoint survives, is loadable, and is never older than the last finished save
        found = checkpoint.resolve(root, "latest")
        assert found is not None and found.name.startswith("step-")
        step_found = int(found.name.split("-")[1])
        assert step_found in (last_done, started), (trial, step_found, last_done, started)
        _check_complete(found)
        faults.check_resume(found, cfg)
        for d in root.glob("step-*"):  # no step-* directory is ever half-written
            _check_complete(d)
        last_done = step_found
    assert mid_save >= TRIALS // 2, f"only {mid_save}/{TRIALS} kills landed inside a save"
    assert last_done < steps

    # finish the killed run (resuming once more) and an uninterrupted one: identical, bit for bit
    p = ctx.Process(target=_child, args=(cfg.to_dict(), os.open(os.devnull, os.O_WRONLY)))
    p.start()
    p.join()
    assert p.exitcode == 0
    train(ref, DistEnv())
    a = torch.load(root / f"step-{steps:07d}" / "engine.pt", weights_only=True)
    b = torch.load(ref.checkpoint_dir / f"step-{steps:07d}" / "engine.pt", weights_only=True)
    # the one-rank default engine (per-layer): weights, optimizer state, window and schedule
    assert set(a) == {"model", "layerwise"} and same(a, b)
    assert a["layerwise"]["lr_scheduler"]["last_epoch"] == b["layerwise"]["lr_scheduler"]["last_epoch"] == steps
    print(f"\n{TRIALS} SIGKILLs, {mid_save} inside a save, last checkpoint before the final run: step {last_done}")


# ------------------------------------------------------------------------------ dying ranks
WORKER = Path(__file__).resolve().parent / "dist" / "reliability_worker.py"


# (engine.mode, engine.deepspeed): FSDP2, and DeepSpeed under torchrun (its own launcher has
# no restarts). NaN at fp32 ZeRO-0 is the optimizer's own check; ZeRO-2 shards the state.
ENGINES = {"fsdp": ("fsdp", {}), "deepspeed-zero0": ("deepspeed", {}),
           "deepspeed-zero2": ("deepspeed", {"zero_optimization": {"stage": 2}}),
           # HSDP 2 x 2 without clipping: the optimizer averages projected gradients over replicas
           "hsdp-lowrank": ("fsdp", {})}


def _torchrun(tmp_path: Path, name: str, cache_dir: str, kill_at: int, restarts: int,
              nan_at: int = 0, engine: str = "fsdp") -> tuple[Path, str, str]:
    import subprocess
    import sys

    mode, ds = ENGINES[engine]
    hsdp = engine == "hsdp-lowrank"
    over = dict(training__steps=10, training__micro_batch=2, training__eval_batches=0, galore__update_proj_gap=3,
                engine__mode=mode, engine__deepspeed=ds, checkpoint__every=3)
    if hsdp:
        over.update(engine__fsdp={"replicate": 2}, training__grad_clip=0.0, training__micro_batch=1)
    recipe = tiny_recipe(tmp_path / name, cache_dir, name="dying-rank", **over)
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps(recipe))
    env = launcher_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", KILL_AT=str(kill_at), KILL_RANK="1", NAN_AT=str(nan_at), NAN_RANK="1",
               KILL_ENGINE=mode,
               PYTHONPATH=str(WORKER.parents[2]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        "4" if hsdp else "2",
                        "--max-restarts", str(restarts), str(WORKER), "--config", str(cfg), "--resume"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return tmp_path / name / "ckpt", r.stdout, r.stderr


def _dcp_state(step_dir: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent.parent / "full.pt"
    dcp_to_torch_save(step_dir / "dcp", out)
    return torch.load(out, weights_only=True)


def _final_state(step_dir: Path, engine: str) -> tuple[dict, int, list[float]]:
    """(every tensor of the checkpoint, the lr scheduler's last_epoch, GaLore step counts)."""
    if engine in ("fsdp", "hsdp-lowrank"):
        st = _dcp_state(step_dir)
        epoch = torch.load(step_dir / "scheduler.pt", weights_only=True)["scheduler"]["last_epoch"]
        return st, epoch, [float(v) for k, v in st["optim"].items() if k.endswith(".step")]
    # DeepSpeed's files (its own pickles: config objects inside, so not weights_only)
    st = {f.name: torch.load(f, weights_only=False) for f in sorted((step_dir / "galore_ds").glob("*.pt"))}
    model = st["mp_rank_00_model_states.pt"]
    opt = [v["optimizer_state_dict"] if "optimizer_state_dict" in v else v.get("optimizer") for v in st.values()]
    steps = [float(s["step"]) for o in opt if o for s in _galore_states(o)]
    return {k: {"module": v.get("module"), "optimizer": v.get("optimizer"),
                "optimizer_state_dict": v.get("optimizer_state_dict")} for k, v in st.items()}, \
        model["lr_scheduler"]["last_epoch"], steps


def _galore_states(opt_sd) -> list[dict]:
    """The per-matrix GaLore states inside a DeepSpeed optimizer checkpoint (any stage)."""
    found = []
    if isinstance(opt_sd, dict):
        if "step" in opt_sd and ("exp_avg" in opt_sd or "proj" in opt_sd):
            return [opt_sd]
        for v in opt_sd.values():
            found += _galore_states(v)
    elif isinstance(opt_sd, (list, tuple)):
        for v in opt_sd:
            found += _galore_states(v)
    return found


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed-zero2"])
def test_dying_rank_restarts_from_checkpoint_and_ends_where_an_uninterrupted_run_ends(tmp_path, cache_dir, engine):
    # Rank 1 SIGKILLs itself at the start of step 5 (checkpoints at 3, 6, 9, 10); torchrun restarts
    # both ranks, which resume from step 3 and redo steps 4-5 with the same data.
    import re

    killed, out, err = _torchrun(tmp_path, "killed", cache_dir, kill_at=5, restarts=1, engine=engine)
    assert "exitcode: -9" in err, err[-3000:]                # rank 1 really died (SIGKILL)
    assert out.count("dying-rank: ") == 2                    # ...and the job started twice
    # first attempt saved step 3; the restart resumed from it (never re-saved 3) and went on
    assert re.findall(r"saved checkpoint \S*step-0*(\d+)", out) == ["3", "6", "9", "10"], out
    ref, _, _ = _torchrun(tmp_path, "ref", cache_dir, kill_at=0, restarts=0, engine=engine)
    (a, epoch, steps), (b, _, _) = _final_state(killed / "step-0000010", engine), _final_state(ref / "step-0000010", engine)
    assert set(a) == set(b) and len(a) >= 2
    assert same(a, b), "the restarted run does not end with the uninterrupted run's weights/optimizer state"
    assert epoch == 10 and steps and set(steps) == {10.0}


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed-zero0", "deepspeed-zero2", "hsdp-lowrank"])
def test_nan_on_one_rank_skips_the_step_on_both_ranks(tmp_path, cache_dir, engine):
    # Only rank 1's loss is NaN in step 4; the global (all-reduced) norm is NaN on both ranks, so
    # both skip: 10 batches, 9 optimizer steps everywhere, nothing poisoned, nothing hung.
    ckpt, out, err = _torchrun(tmp_path, "nan", cache_dir, kill_at=0, restarts=0, nan_at=4, engine=engine)
    rows = [json.loads(x) for x in (tmp_path / "nan" / "run" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0] + [1] * 7
    assert rows[3]["grad_norm"] is None and all(r["grad_norm"] is not None for i, r in enumerate(rows) if i != 3)
    st, epoch, steps = _final_state(ckpt / "step-0000010", engine)
    assert epoch == 9  # the lr schedule did not advance on the skipped step
    assert all(torch.isfinite(t).all() for t in flat(st))
    assert steps and set(steps) == {9.0}, steps  # every matrix on every rank: 9 optimizer steps
