"""Every shipped recipe (configs/*.json), shrunk to a tiny width but otherwise unchanged (its
optimizer, lr, GaLore settings, clipping, dtype and engine sections), runs a few steps on
every engine it names: `auto` on one rank, and its multi-rank engine (engine.multi_rank,
with its engine.deepspeed section) on two."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import matrix
from netutil import free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "configs").glob("*.json"))


def shrunk(name: str, root: Path, cache: Path, world: int) -> dict:
    rec = json.loads((ROOT / "configs" / f"{name}.json").read_text())
    rec["model"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=None, vocab_size=320, max_position_embeddings=32)
    rec["data"] = {"source": "python-stdlib", "tokenizer": "bpe", "streaming": False, "max_chars": 40_000,
                   "seq_len": 32, "cache_dir": str(cache)}   # the recipes' corpora need a network
    rec["training"].update(steps=3, warmup_steps=1, global_batch=4 * world, micro_batch=2, eval_every=0,
                           eval_batches=1)
    rec.setdefault("galore", {})["rank"] = 8
    rec["checkpoint"] = {"dir": str(root / "ckpt"), "every": 0, "keep_last": 1}
    rec["logging"] = {"run_dir": str(root / "run"), "progress_bar": False, "log_every": 1}
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("shipped"), tmp_path_factory.mktemp("cache")
    out = {}
    for world in (1, 2):
        jobs = [{"name": f"{n}-w{world}", "recipe": shrunk(n, root / f"{n}-w{world}", cache, world)} for n in RECIPES]
        engine = json.loads((ROOT / "configs" / "7b.json").read_text())["engine"].get("multi_rank", "deepspeed")
        kind = "python" if world == 1 else ("deepspeed" if engine == "deepspeed" else "torchrun")
        out.update(matrix.launch(kind, world, jobs, root / "launch", free_port()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_runs_on_the_engines_it_names(runs, name, world):
    r = runs[f"{name}-w{world}"]
    assert r["ok"], f"{r.get('error')}\n{r.get('trace')}"
    assert "refused" not in r, r["refused"]
    steps = r["metrics"]["train"]
    assert sorted(int(s) for s in steps) == [1, 2, 3]
    assert all(v[0] == v[0] and abs(v[0]) < 1e3 for v in steps.values())  # finite losses
