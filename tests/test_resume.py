"""What a user meets between runs: evaluation before an FSDP checkpoint, DeepSpeed resumes on
another world size, checkpoint rotation after a resume, a recipe changed at resume, engine
set-up errors, eval_batches=0, and DeepSpeed's shared-memory buffers. Each test failed
before its fix (see the issue on recipes that run, evaluate, checkpoint and resume)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import matrix
from netutil import free_port, launcher_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _case(**over) -> dict:
    base = dict(engine="single", optimizer="galore_adamw", dtype="float32", refresh="svd", moments="keep",
                stagger=False, accumulation=1, clip="exact", world=1, resume_on="same")
    return {**base, **over}


def _env(**extra) -> dict:
    return launcher_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)


def _train(launcher: list[str], recipe: dict, tmp: Path, *sets: str, check: bool = True):
    path = tmp / f"recipe-{len(list(tmp.glob('recipe-*')))}.json"
    path.write_text(json.dumps(recipe))
    cmd = [*launcher, str(ROOT / "launch" / "train.py"), "--config", str(path)]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# ------------------------------------------------------------------ FSDP: eval, then checkpoint
@pytest.mark.slow
def test_fsdp_checkpoint_right_after_an_evaluation_saves_and_resumes(tmp_path):
    """The shipped tiny recipe on FSDP evaluates and checkpoints at the same step: an eval
    forward leaves FSDP2's root parameters gathered, and the checkpoint used to fail to find
    the optimizer's (sharded) parameters (KeyError)."""
    sets = ["engine.mode=fsdp", "training.steps=4", "training.warmup_steps=1", "training.eval_every=2",
            "training.eval_batches=2", "checkpoint.every=2", "checkpoint.keep_last=0",
            f"logging.run_dir={tmp_path / 'run'}", "logging.progress_bar=false", "data.max_chars=200000",
            f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [*TORCHRUN2, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny.json")]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "step-0000002" / "trainer.pt").exists() and (ckpt / "step-0000004" / "trainer.pt").exists()
    full = {x["step"]: x["loss"] for x in _rows(tmp_path / "run") if "loss" in x}
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    r = subprocess.run(cmd + ["--resume", str(ckpt / "step-0000002")], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    again = {x["step"]: x["loss"] for x in _rows(tmp_path / "run") if "loss" in x}
    assert again == {s: full[s] for s in (3, 4)}


# ------------------------------------------------------------------ DeepSpeed on another world size
DS_RESUMES = [(opt, stage, w2) for opt, w2s in (("galore_adamw", (1, 3, 1)), ("galore_adamw8bit", (3, 1, 3)),
                                               ("galore_adafactor", (1, 3, 3)))
              for stage, w2 in zip((1, 2, 3), w2s)]


@pytest.fixture(scope="module")
def ds_resumes(tmp_path_factory):
    """ZeRO 1-3 x the three optimizers: run on 2 ranks (checkpoint at step 2), resume on 1 or 3."""
    root = tmp_path_factory.mktemp("dsres")
    cache = tmp_path_factory.mktemp("cache")
    cases = [_case(engine=f"deepspeed{stage}", optimizer=opt, world=2, resume_on="other") for opt, stage, _ in DS_RESUMES]
    jobs = {}
    for case, (_, _, w2) in zip(cases, DS_RESUMES):
        name = matrix.case_name(case)
        jobs.setdefault(2, []).append({"name": f"{name}/run", "recipe": matrix.recipe(case, root / name / "a", cache)})
        jobs.setdefault(w2, []).append({"name": f"{name}/resume", "recipe": matrix.recipe(case, root / name / "b", cache, w2),
                                        "resume": str(root / name / "a" / "ckpt" / f"step-{matrix.EVERY:07d}")})
    out = {}
    for world in (2, 1, 3):
        out.update(matrix.launch("deepspeed", world, jobs[world], root / "launch", free_port()))
    return cases, out


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(DS_RESUMES)), ids=[f"{o}-zero{s}-2to{w}" for o, s, w in DS_RESUMES])
def test_deepspeed_resumes_on_another_world_size(ds_resumes, i):
    cases, out = ds_resumes
    case = cases[i]
    name = matrix.case_name(case)
    run, resume = out[f"{name}/run"], out[f"{name}/resume"]
    assert run["ok"] and resume["ok"], (run.get("trace"), resume.get("trace"))
    ok, worst, detail = matrix.compare(case, run, resume)
    assert ok, detail


# ------------------------------------------------------------------ rotation after a resume
def test_rotation_after_a_resume_keeps_the_checkpoint_it_just_wrote(tmp_path):
    """Checkpoints at 2, 4, 6; a run resumed from step 2 with keep_last=2 saves step 3: it keeps
    2 and 3, leaves the abandoned 4 and 6 alone, and `latest` names step 3 (it used to delete
    2 and 3 and keep 4 and 6, and the next --resume continued the abandoned run)."""
    from galore_ds.train import checkpoint

    class Fake:
        rank, is_main = 0, True

        class dist:
            local_rank = 0

        def barrier(self):
            pass

        def save(self, directory):
            (Path(directory) / "engine.pt").write_text("x")

    engine = Fake()
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, engine, {"step": step}, keep_last=0)
    checkpoint.save(tmp_path, 3, engine, {"step": 3}, keep_last=2)
    names = sorted(p.name for p in tmp_path.glob("step-*"))
    assert names == ["step-0000002", "step-0000003", "step-0000004", "step-0000006"]
    assert checkpoint.resolve(tmp_path, "latest") == tmp_path / "step-0000003"
    checkpoint.save(tmp_path, 4, engine, {"step": 4}, keep_last=2)   # the resumed run reaches 4
    names = sorted(p.name for p in tmp_path.glob("step-*"))
    assert names == ["step-0000003", "step-0000004", "step-0000006"]
    assert torch.load(tmp_path / "step-0000004" / "trainer.pt", weights_only=True)["step"] == 4


# ------------------------------------------------------------------ the recipe given at resume
LR_ENGINES = {"single": ([sys.executable], 1), "layerwise": ([sys.executable], 1), "fsdp": (TORCHRUN2, 2),
              "deepspeed2": ([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "{port}"], 2)}


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(LR_ENGINES))
def test_resume_takes_the_recipes_lr_and_clip(tmp_path, engine):
    """--set training.lr at resume used to be ignored on single, per-layer and DeepSpeed (torch's
    load_state_dict and LambdaLR restore the saved lr). The resumed step's lr is the new
    recipe's schedule at the saved step."""
    from galore_ds.train.scheduler import lr_factor

    launcher, world = LR_ENGINES[engine]
    launcher = [a.replace("{port}", str(free_port())) for a in launcher]
    case = _case(engine=engine, world=world)
    rec = matrix.recipe(case, tmp_path / "a", tmp_path / "cache")
    _train(launcher, rec, tmp_path)
    ckpt = tmp_path / "a" / "ckpt" / "step-0000002"
    rec_b = matrix.recipe(case, tmp_path / "b", tmp_path / "cache")
    rec_b["training"]["lr"] = 0.002
    _train(launcher, rec_b, tmp_path, f"checkpoint.resume={ckpt}")
    rows = {x["step"]: x for x in _rows(tmp_path / "b" / "run") if "loss" in x}
    t = rec_b["training"]
    assert rows[3]["lr"] == pytest.approx(0.002 * lr_factor(2, t["warmup_steps"], t["steps"], 0.1), rel=1e-9)


@pytest.fixture(scope="module")
def two_step_checkpoint(tmp_path_factory):
    """One run's step-2 checkpoint, shared by the refusal cases (a refused resume writes nothing)."""
    root = tmp_path_factory.mktemp("refusals")
    _train([sys.executable], matrix.recipe(_case(), root / "a", root / "cache"), root)
    return root


@pytest.mark.parametrize("key,value", [("galore.rank", 4), ("galore.target_modules", ["mlp"]),
                                       ("training.optimizer", "galore_adafactor"), ("model.hidden_size", 64),
                                       ("galore.proj_type", "left")])
def test_resume_refuses_what_the_state_depends_on_naming_the_key(tmp_path, two_step_checkpoint, key, value):
    root = two_step_checkpoint
    rec = matrix.recipe(_case(), tmp_path / "b", root / "cache")
    sec, k = key.split(".")
    rec[sec][k] = value
    if key == "model.hidden_size":
        rec["model"]["intermediate_size"] = 64
    r = _train([sys.executable], rec, tmp_path, f"checkpoint.resume={root / 'a' / 'ckpt' / 'step-0000002'}",
               check=False)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}:"), r.stderr[-2000:]


def test_single_engine_checkpoint_keeps_skipped_steps(tmp_path):
    from galore_ds.train.config import DistEnv
    from galore_ds.train.engines.single import SingleEngine
    from galore_ds.train.model import build_model
    from recipes import tiny_cfg

    cfg = tiny_cfg(tmp_path, str(tmp_path / "cache"), engine__mode="single")
    a = SingleEngine(cfg, DistEnv())
    a.setup(build_model(cfg.model))
    a.skipped_steps = 3
    a.save(tmp_path)
    b = SingleEngine(cfg, DistEnv())
    b.setup(build_model(cfg.model))
    b.load(tmp_path)
    assert b.skipped_steps == 3


# ------------------------------------------------------------------ set-up errors, eval, /dev/shm
@pytest.mark.slow
def test_invalid_deepspeed_section_is_one_line_and_exit_2(tmp_path):
    port = free_port()
    rec = matrix.recipe(_case(engine="deepspeed2", world=2), tmp_path / "a", tmp_path / "cache")
    rec["engine"]["deepspeed"]["zero_optimization"]["stage"] = 7
    r = _train([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)], rec, tmp_path, check=False)
    assert r.returncode != 0
    errors = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("error: ")]
    assert errors and errors[0].startswith("error: engine.deepspeed:"), (r.stdout + r.stderr)[-2000:]
    assert "Traceback" not in r.stdout + r.stderr


def test_replicate_not_dividing_the_world_is_refused_before_anything_starts(tmp_path):
    rec = matrix.recipe(_case(engine="hsdp", world=3), tmp_path / "a", tmp_path / "cache")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(path), "--check"],
                       env=_env(RANK="0", WORLD_SIZE="3"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: engine.fsdp.replicate:"), r.stderr


def test_eval_batches_0_prints_no_eval_loss(tmp_path):
    rec = matrix.recipe(_case(), tmp_path / "a", tmp_path / "cache")
    rec["training"]["eval_batches"] = 0
    r = _train([sys.executable], rec, tmp_path)
    assert "eval loss" not in r.stdout and "nan" not in r.stdout.lower(), r.stdout
    assert not any("eval_loss" in x for x in _rows(tmp_path / "a" / "run"))


@pytest.mark.slow
def test_deepspeed_on_cpu_leaves_no_shared_memory_buffer(tmp_path):
    """DeepSpeed's CPU all-reduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    per rank and never unlinks it (69 MB each): the engine removes its own."""
    port = free_port()
    rec = matrix.recipe(_case(engine="deepspeed0", world=2), tmp_path / "a", tmp_path / "cache")
    _train([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)], rec, tmp_path)
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, left
