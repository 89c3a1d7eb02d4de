"""The smallest recipe that exercises the whole training stack (shared by the train tests)."""
from __future__ import annotations

import torch

from galore_ds.train.config import DistEnv, from_dict, validate


def tiny_recipe(tmp_path, cache_dir, name: str = "t", **over) -> dict:
    """The recipe as JSON-ready dict: a 2-layer, hidden-32 LLaMA on 60k characters of stdlib
    text, checkpoints and run files under tmp_path; `section__key=value` overrides any key
    (e.g. training__steps=30, engine__mode="fsdp")."""
    d = {
        "name": name,
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "vocab_size": 400, "max_position_embeddings": 32},
        "data": {"source": "python-stdlib", "max_chars": 60_000, "seq_len": 32, "cache_dir": cache_dir},
        "training": {"steps": 6, "lr": 0.01, "warmup_steps": 2, "global_batch": 8, "micro_batch": 4,
                     "grad_clip": 1.0, "eval_batches": 2},
        "galore": {"rank": 8, "update_proj_gap": 2},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "keep_last": 0},
        "logging": {"run_dir": str(tmp_path / "run"), "progress_bar": False},
    }
    for path, value in over.items():
        sec, key = path.split("__")
        d.setdefault(sec, {})[key] = value
    return d


def tiny_cfg(tmp_path, cache_dir, name: str = "t", **over):
    """`tiny_recipe`, validated into a Config."""
    return validate(from_dict(tiny_recipe(tmp_path, cache_dir, name, **over)), DistEnv())


def flat(obj):
    """Every tensor (and scalar, as a tensor) in a nested state, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from flat(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from flat(v)
    elif isinstance(obj, (int, float, bool, str)) or obj is None:
        yield torch.tensor(float(hash(obj) % 1_000_003) if not isinstance(obj, (int, float)) else float(obj))
