"""The recipe schema: every bad input is one ConfigError naming the key and the fix; the
launcher turns it into exit code 2 and one line, before importing torch and writing nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from galore_ds.train.config import (Config, ConfigError, DistEnv, apply_overrides, dist_env, from_dict,
                              load_config, validate)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["tiny", "60m", "130m", "350m", "1b", "7b"]
# The paper recipes stream C4 (needs `datasets` + network); validate them on the local corpus.
LOCAL = ["data.source=python-stdlib", "data.eval_source=null"]


def check(data: dict, world: int = 1) -> Config:
    return validate(from_dict(data), DistEnv(world_size=world))


def small(**sections) -> dict:
    d = {"model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "vocab_size": 512},
         "training": {"global_batch": 8, "micro_batch": 4},
         "galore": {"rank": 16}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return d


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_recipes_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.json", LOCAL, dist=DistEnv())
    assert cfg.name == name


def test_paper_shapes_and_hyperparameters():
    shapes = {"60m": (512, 1376, 8, 8, 128), "130m": (768, 2048, 12, 12, 256), "350m": (1024, 2736, 24, 16, 256),
              "1b": (2048, 5461, 24, 32, 1024), "7b": (4096, 11008, 32, 32, 1024)}
    for name, (h, i, L, heads, rank) in shapes.items():
        c = load_config(ROOT / "configs" / f"{name}.json", LOCAL, dist=DistEnv())
        m = c.model
        assert (m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.num_attention_heads) == (h, i, L, heads)
        assert (m.vocab_size, c.data.seq_len, c.galore.rank, c.galore.scale) == (32000, 256, rank, 0.25)
        assert c.training.global_batch == 512 and c.training.min_lr_ratio == 0.1
        assert c.training.lr == (0.005 if name == "7b" else 0.01)
        assert c.galore.update_proj_gap == (500 if name == "7b" else 200)


@pytest.mark.parametrize("data, key", [
    ({"modle": {}}, "modle"),                                           # unknown section
    ({"model": 5}, "model"),                                            # a section that is not an object
    (small(training={"lr_max": 1.0}), "training.lr_max"),               # unknown key
    (small(training={"steps": "100"}), "training.steps"),               # wrong type
    (small(training={"lr": True}), "training.lr"),                      # bool is not a number
    (small(galore={"target_modules": "attn"}), "galore.target_modules"),
    (small(galore={"rank": 0}), "galore.rank"),                         # rank <= 0
    (small(galore={"rank": -3}), "galore.rank"),
    (small(galore={"rank": 65}), "galore.rank"),                        # larger than the matrices
    (small(galore={"update_proj_gap": 0}), "galore.update_proj_gap"),
    (small(training={"lr": -0.1}), "training.lr"),                      # negative lr
    (small(training={"steps": -5}), "training.steps"),                  # negative steps
    (small(training={"steps": 0}), "training.steps"),
    (small(training={"global_batch": 10, "micro_batch": 4}), "training.global_batch"),
    (small(data={"source": "/nonexistent/corpus.txt"}), "data.source"),  # missing path
    (small(data={"eval_source": "/nonexistent/eval.jsonl"}), "data.eval_source"),
    (small(data={"seq_len": 4096}), "data.seq_len"),
    (small(engine={"mode": "zero3"}), "engine.mode"),
    (small(galore={"refresh": "qr"}), "galore.refresh"),
    (small(training={"optimizer": "sgd"}), "training.optimizer"),
    (small(model={"num_attention_heads": 5}), "model.num_attention_heads"),
    (small(training={"warmup_steps": 1000, "steps": 10}), "training.warmup_steps"),
])
def test_bad_recipe_names_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        check(data)
    assert e.value.key == key
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and "; " in msg and "\n" not in msg
    assert e.value.fix  # says what to do


def test_batch_must_divide_by_world_size():
    check(small(training={"global_batch": 8, "micro_batch": 4}), world=2)
    with pytest.raises(ConfigError) as e:
        check(small(training={"global_batch": 8, "micro_batch": 4}), world=3)
    assert e.value.key == "training.global_batch" and "world_size" in str(e.value)


def test_single_mode_refuses_several_ranks():
    with pytest.raises(ConfigError, match="engine.mode"):
        check(small(engine={"mode": "single"}), world=2)


def test_set_overrides_parse_json_and_strings():
    d = apply_overrides(small(), ["training.lr=0.002", "galore.target_modules=[\"mlp\"]",
                                  "data.source=python-stdlib", "engine.deepspeed.zero_optimization.stage=2",
                                  "checkpoint.resume=null"])
    c = check(d)
    assert c.training.lr == 0.002 and c.galore.target_modules == ["mlp"]
    assert c.engine.deepspeed == {"zero_optimization": {"stage": 2}} and c.checkpoint.resume is None


@pytest.mark.parametrize("item, key", [("training.lrr=1", "training.lrr"), ("foo=1", "foo"),
                                        ("training.lr.x=1", "training.lr"), ("training.lr", "--set")])
def test_unknown_set_key_is_rejected(item, key):
    with pytest.raises(ConfigError) as e:
        apply_overrides(small(), [item])
    assert e.value.key == key


def test_invalid_and_empty_json(tmp_path):
    (tmp_path / "bad.json").write_text("{\"model\": {")
    (tmp_path / "empty.json").write_text("  \n")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name in ("bad.json", "empty.json", "list.json", "missing.json"):
        with pytest.raises(ConfigError):
            load_config(tmp_path / name, dist=DistEnv())


def test_comment_keys_are_ignored():
    check({**small(), "_comment": "anything", "model": {**small()["model"], "_why": "x"}})


def test_dist_env_reads_every_launcher():
    assert dist_env({}) == DistEnv()
    assert dist_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}).world_size == 4
    assert dist_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3",
                     "OMPI_COMM_WORLD_LOCAL_RANK": "0"}) == DistEnv(2, 3, 0, "openmpi")
    assert dist_env({"PMI_RANK": "1", "PMI_SIZE": "2"}).rank == 1


def test_auto_mode_picks_per_layer_for_one_rank_and_the_configured_engine_for_several():
    c = check(small(engine={"multi_rank": "fsdp"}))
    assert c.resolved_mode(DistEnv()) == "layerwise"  # the 24 GB mode
    assert c.resolved_mode(DistEnv(0, 2, 0)) == "fsdp"
    baseline = check(small(training={**small()["training"], "optimizer": "adamw"},
                           galore={**small().get("galore", {}), "enabled": False}))
    assert baseline.resolved_mode(DistEnv()) == "single"  # full-rank AdamW: no per-layer mode


# ---- the launcher: exit 2, one line, nothing written --------------------------------------------
def run_launcher(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, key", [
    (["--set", "galore.rank=0"], "galore.rank"),
    (["--set", "training.micro_batch=3"], "training.global_batch"),
    (["--set", "training.nope=1"], "training.nope"),
])
def test_launcher_exits_2_with_one_line(tmp_path, args, key):
    r = run_launcher(tmp_path, "--config", str(ROOT / "configs" / "tiny.json"),
                     "--set", f"logging.run_dir={tmp_path}/run", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_launcher_rejects_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run_launcher(tmp_path, "--config", str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not valid JSON" in r.stderr
