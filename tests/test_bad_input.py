"""Bad input never costs anything: every bad recipe, flag, environment, data set or checkpoint
ends launch/train.py with exit code 2 and ONE line `error: <key>: <problem>; <fix>` on stderr,
no traceback, and nothing written or overwritten in the run directory or the checkpoint
directory (both are pre-filled from an earlier run and compared byte for byte afterwards).

Most cases call launch/train.py's main() in-process (its SystemExit carries the exit code);
a handful run it as a real subprocess to check the code and the single stderr line end to end."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from recipes import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
              "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


def _launch_module():
    spec = importlib.util.spec_from_file_location("galore_launch_train", ROOT / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LAUNCH = _launch_module()


def base_recipe(work: Path, cache: str) -> dict:
    return tiny_recipe(work, cache, name="bad-input", training__steps=2, training__warmup_steps=0,
                       training__eval_batches=1)


def merge(d: dict, patch: dict) -> dict:
    out = copy.deepcopy(d)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, cache_dir):
    """A real finished run (run dir + checkpoint) that every case starts from."""
    from galore_ds.train.config import DistEnv, from_dict, validate
    from galore_ds.train.trainer import train

    work = tmp_path_factory.mktemp("earlier")
    train(validate(from_dict(base_recipe(work, cache_dir)), DistEnv()), DistEnv())
    assert (work / "ckpt" / "step-0000002" / "trainer.pt").is_file()
    return work


def snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir():
            out[rel] = "dir"
        else:
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# --------------------------------------------------------------------------------------------
# Cases: (id, recipe patch, extra argv, launcher env, text the error line must contain).
# A patch value may be a callable(work) -> value, for paths made inside the case directory.
# --------------------------------------------------------------------------------------------
def _file(name: str, text: str | bytes):
    def make(work: Path) -> str:
        p = work / "data" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
        return str(p)
    return make


def _empty_dir(work: Path) -> str:
    p = work / "data" / "nothing_here"
    p.mkdir(parents=True, exist_ok=True)
    (p / "image.bin").write_bytes(b"\0\1\2")  # not a text suffix: ignored
    return str(p)


def _ckpt(work: Path) -> str:
    return str(work / "ckpt" / "step-0000002")


def _incomplete_ckpt(work: Path) -> str:
    p = work / "ckpt" / "step-0000002"
    half = work / "half" / "step-0000002"
    half.parent.mkdir(parents=True)
    shutil.copytree(p, half)
    (half / "trainer.pt").unlink()
    return str(half)


def _corrupt(name: str):
    def make(work: Path) -> str:
        p = work / "ckpt" / "step-0000002"
        bad = work / "corrupt" / "step-0000002"
        bad.parent.mkdir(parents=True)
        shutil.copytree(p, bad)
        data = (bad / name).read_bytes()
        (bad / name).write_bytes(data[: len(data) // 2])  # torn file
        return str(bad)
    return make


WORLD3 = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
WORLD2 = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}

CASES = [
    # ---- flags -------------------------------------------------------------------------------
    ("flag-unknown", {}, ["--bogus"], {}, "arguments"),
    ("flag-set-no-equals", {}, ["--set", "training.lr"], {}, "--set"),
    ("flag-set-unknown-key", {}, ["--set", "training.learning_rate=0.1"], {}, "training.learning_rate"),
    ("flag-set-into-value", {}, ["--set", "training.lr.x=1"], {}, "training.lr"),
    ("flag-resume-missing-dir", {}, ["--resume", "/nonexistent/step-0000009"], {}, "checkpoint.resume"),
    # ---- recipe keys and types ---------------------------------------------------------------
    ("key-unknown-section", {"optimiser": {}}, [], {}, "optimiser"),
    ("key-unknown-nested", {"model": {"hidden": 64}}, [], {}, "model.hidden"),
    ("type-string-for-number", {"training": {"lr": "fast"}}, [], {}, "training.lr"),
    ("type-bool-for-int", {"model": {"num_hidden_layers": True}}, [], {}, "model.num_hidden_layers"),
    ("type-section-not-object", {"galore": [1, 2]}, [], {}, "galore"),
    ("type-list-expected", {"galore": {"target_modules": "attn"}}, [], {}, "galore.target_modules"),
    # ---- recipe values -----------------------------------------------------------------------
    ("heads-do-not-divide", {"model": {"num_attention_heads": 3}}, [], {}, "model.num_attention_heads"),
    ("kv-heads-do-not-divide", {"model": {"num_key_value_heads": 3}}, [], {}, "model.num_key_value_heads"),
    ("vocab-too-small-for-bpe", {"model": {"vocab_size": 100}}, [], {}, "model.vocab_size"),
    ("seq-longer-than-positions", {"data": {"seq_len": 64}}, [], {}, "data.seq_len"),
    ("negative-lr", {"training": {"lr": -1e-3}}, [], {}, "training.lr"),
    ("zero-steps", {"training": {"steps": 0}}, [], {}, "training.steps"),
    ("warmup-longer-than-run", {"training": {"warmup_steps": 10}}, [], {}, "training.warmup_steps"),
    ("beta-one", {"training": {"beta2": 1.0}}, [], {}, "training.beta2"),
    ("unknown-clip-timing", {"training": {"clip_timing": "later"}}, [], {}, "training.clip_timing"),
    ("unknown-optimizer", {"training": {"optimizer": "sgd"}}, [], {}, "training.optimizer"),
    ("adamw-with-galore", {"training": {"optimizer": "adamw"}}, [], {}, "galore.enabled"),
    ("rank-larger-than-matrices", {"galore": {"rank": 64}}, [], {}, "galore.rank"),
    ("rank-zero", {"galore": {"rank": 0}}, [], {}, "galore.rank"),
    ("targets-match-nothing", {"galore": {"target_modules": ["embed"]}}, [], {}, "galore.target_modules"),
    ("unknown-proj-type", {"galore": {"proj_type": "middle"}}, [], {}, "galore.proj_type"),
    ("unknown-engine", {"engine": {"mode": "zero3"}}, [], {}, "engine.mode"),
    ("fp16-at-zero-stage-0", {"engine": {"mode": "deepspeed", "deepspeed": {"fp16": {"enabled": True}}}}, [], {},
     "engine.deepspeed.fp16"),
    ("keep-last-negative", {"checkpoint": {"keep_last": -1}}, [], {}, "checkpoint.keep_last"),
    # ---- launcher environment ----------------------------------------------------------------
    ("world-cannot-shard-batch", {}, [], WORLD3, "training.global_batch"),
    ("single-engine-two-ranks", {"engine": {"mode": "single"}}, [], WORLD2, "engine.mode"),
    ("rank-env-not-integer", {}, [], {"RANK": "zero", "WORLD_SIZE": "1"}, "RANK"),
    # ---- data --------------------------------------------------------------------------------
    ("data-missing-path", {"data": {"source": "/nonexistent/corpus.txt"}}, [], {}, "data.source"),
    ("data-empty-file", {"data": {"source": _file("empty.txt", "")}}, [], {}, "data.source"),
    ("data-too-short", {"data": {"source": _file("short.txt", "tiny corpus")}}, [], {}, "data.source"),
    ("data-jsonl-not-json", {"data": {"source": _file("bad.jsonl", '{"text": "ok"}\n{not json\n')}}, [], {},
     "data.source"),
    ("data-jsonl-no-text-field", {"data": {"source": _file("other.jsonl", '{"body": "x"}\n' * 5)}}, [], {},
     "data.source"),
    ("data-dir-without-text", {"data": {"source": _empty_dir}}, [], {}, "data.source"),
    ("data-eval-missing", {"data": {"eval_source": "/nonexistent/eval.txt"}}, [], {}, "data.eval_source"),
    # ---- checkpoints -------------------------------------------------------------------------
    ("ckpt-another-model", {"model": {"hidden_size": 64}, "checkpoint": {"resume": _ckpt}}, [], {},
     "model.hidden_size: is 64 but the checkpoint"),
    ("ckpt-another-rank", {"galore": {"rank": 4}, "checkpoint": {"resume": _ckpt}}, [], {}, "galore.rank"),
    ("ckpt-other-galore-targets", {"galore": {"target_modules": ["attn"]}, "checkpoint": {"resume": _ckpt}}, [], {},
     "galore.target_modules: is ['attn'] but the checkpoint"),
    ("ckpt-incomplete", {"checkpoint": {"resume": _incomplete_ckpt}}, [], {}, "not a complete checkpoint"),
    ("ckpt-torn-trainer-file", {"checkpoint": {"resume": _corrupt("trainer.pt")}}, [], {}, "cannot be read"),
    ("ckpt-torn-engine-file", {"checkpoint": {"resume": _corrupt("engine.pt")}}, [], {}, "torn or missing"),
]


def _resolve(patch, work: Path):
    if callable(patch):
        return patch(work)
    if isinstance(patch, dict):
        return {k: _resolve(v, work) for k, v in patch.items()}
    return patch


def prepare(tmp_path: Path, earlier: Path, cache: str, patch: dict) -> tuple[Path, Path]:
    """A case directory holding a copy of the earlier run and a patched recipe."""
    work = tmp_path / "work"
    shutil.copytree(earlier, work)
    recipe = merge(base_recipe(work, cache), _resolve(patch, work))
    cfg_path = tmp_path / "recipe.json"
    cfg_path.write_text(json.dumps(recipe))
    return work, cfg_path


def assert_one_line(err: str, expect: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert expect in lines[0], lines[0]
    assert "Traceback" not in err


def test_at_least_25_distinct_cases():
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids) >= 25


@pytest.mark.parametrize("case_id, patch, argv, env, expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exit_2_one_line_nothing_written(case_id, patch, argv, env, expect, tmp_path, earlier_run,
                                                   cache_dir, monkeypatch, capsys):
    work, cfg_path = prepare(tmp_path, earlier_run, cache_dir, patch)
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = snapshot(work)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        LAUNCH.main(["--config", str(cfg_path), *argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2, (e.value.code, err)
    assert_one_line(err, expect)
    assert snapshot(work) == before, "a failed start wrote into the run or checkpoint directory"


# ------------------------------------------------------------------------ real subprocesses
SUBPROCESS_CASES = [
    ("config-missing", None, [], {}, "--config"),
    ("config-not-json", "{\"model\": {", [], {}, "not valid JSON"),
    ("config-not-object", "[1, 2, 3]", [], {}, "JSON object"),
    ("config-empty", "   \n", [], {}, "is empty"),
    ("no-config-flag", "skip", [], {}, "--config"),
    ("world-size-3", {}, [], WORLD3, "training.global_batch"),
    ("data-empty-file", {"data": {"source": _file("empty.txt", "")}}, [], {}, "data.source"),
]


@pytest.mark.parametrize("case_id, recipe, argv, env, expect", SUBPROCESS_CASES,
                         ids=[c[0] for c in SUBPROCESS_CASES])
def test_bad_input_subprocess(case_id, recipe, argv, env, expect, tmp_path, earlier_run, cache_dir):
    work = tmp_path / "work"
    shutil.copytree(earlier_run, work)
    cfg_path = tmp_path / "recipe.json"
    args = ["--config", str(cfg_path)]
    if recipe == "skip":
        args = []
    elif isinstance(recipe, str):
        cfg_path.write_text(recipe)
    elif isinstance(recipe, dict):
        cfg_path.write_text(json.dumps(merge(base_recipe(work, cache_dir), _resolve(recipe, work))))
    before = snapshot(work)
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    full_env.update(env, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args, *argv], cwd=tmp_path,
                       env=full_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert_one_line(r.stderr, expect)
    assert snapshot(work) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["work"] + (["recipe.json"] if cfg_path.exists() else []))
