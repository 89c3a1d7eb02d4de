"""Reliability hooks shared by the train loop and the engines.

- Bad input found after validation (data that cannot be read or is too small, a checkpoint
  that is incomplete or from another model) becomes a ConfigError, which launch/train.py
  prints as one line `error: <key>: <problem>; <fix>` and exit code 2, before anything is
  written to logging.run_dir or checkpoint.dir.
- A non-finite global gradient norm skips the whole optimizer step: gradients are dropped,
  optimizer.step() and scheduler.step() are not called, so weights, moments, projectors, the
  optimizer step count and the LR schedule are unchanged. Engines pass the GLOBAL norm (the
  same number on every rank, e.g. all-reduced for clipping), so every rank takes the same
  decision. The batch is consumed (the data position advances) and the skip is counted.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

from galore_ds.train.config import Config, ConfigError

#: step files written by the loop itself (see checkpoint.py)
TRAINER_FILE = "trainer.pt"
#: model sections that must agree between a checkpoint and the recipe resuming from it
_MODEL_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line.split(". ", 1)[0][:200]  # first sentence: one short line


# ------------------------------------------------------------------------------ bad input
@contextlib.contextmanager
def data_errors(cfg: Config) -> Iterator[None]:
    """Turn failures while reading/tokenising/packing the data into one-line ConfigErrors."""
    d = cfg.data
    try:
        yield
    except ConfigError:
        raise
    except json.JSONDecodeError as e:
        raise ConfigError("data.source", f"{d.source!r} holds a line that is not JSON ({e.msg} at line {e.lineno})",
                          "fix the .jsonl file (one JSON object per line)") from None
    except UnicodeError as e:
        raise ConfigError("data.source", f"{d.source!r} cannot be decoded ({_first_line(e)})",
                          "use UTF-8 text files") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as e:
        msg = _first_line(e)
        key = msg.split(":", 1)[0] if msg.startswith(("data.", "model.")) else "data.source"
        problem = msg.split(":", 1)[1].strip() if msg.startswith(key + ":") else msg
        raise ConfigError(key, f"{problem} (data.source={d.source!r}, data.tokenizer={d.tokenizer!r})",
                          "point data.source at readable .txt/.jsonl/.parquet data with at least "
                          "data.seq_len tokens, and data.tokenizer at 'bpe' or an existing tokenizer") from None


def check_resume(directory: Path, cfg: Config) -> dict[str, Any]:
    """A checkpoint directory is complete and was written for this model; returns its trainer state."""
    import torch

    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError("checkpoint.resume", f"{str(directory)!r} is not a checkpoint directory",
                          "use \"latest\", null, or a <checkpoint.dir>/step-* path")
    path = directory / TRAINER_FILE
    if not path.is_file():
        raise ConfigError("checkpoint.resume", f"{str(directory)!r} is not a complete checkpoint (no {TRAINER_FILE})",
                          "resume from a step-* directory written by launch/train.py, or \"latest\"")
    try:
        state = torch.load(path, weights_only=True)
        saved = json.loads(state["config"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input here
        raise ConfigError("checkpoint.resume", f"{str(path)!r} cannot be read ({_first_line(e)})",
                          "resume from an intact checkpoint or start a new checkpoint.dir") from None
    old, new = saved.get("model", {}), cfg.to_dict()["model"]
    for key in _MODEL_KEYS:
        if old.get(key) != new.get(key):
            raise ConfigError(f"model.{key}",
                              f"is {new.get(key)!r} but the checkpoint {str(directory)!r} was written by a model with "
                              f"{old.get(key)!r}",
                              "resume with the recipe that wrote it, or use a new checkpoint.dir")
    # what shapes the optimizer state: changing it at resume cannot be honoured (docs/resume.md)
    for sec, key in (("training", "optimizer"), ("galore", "enabled"), ("galore", "rank"),
                     ("galore", "target_modules"), ("galore", "proj_type"), ("galore", "stagger")):
        a, b = saved.get(sec, {}).get(key), cfg.to_dict()[sec][key]
        if a != b:
            raise ConfigError(f"{sec}.{key}",
                              f"is {b!r} but the checkpoint {str(directory)!r} was written with {a!r}, and the "
                              "optimizer state depends on it",
                              f"resume with {sec}.{key}={json.dumps(a)}, or start a new checkpoint.dir")
    return state


@contextlib.contextmanager
def load_errors(directory: Path) -> Iterator[None]:
    """Engine state that does not fit this model/optimizer (shapes, GaLore rank) -> ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError, EOFError) as e:
        msg = _first_line(e)
        torn = any(s in msg for s in ("PytorchStreamReader", "zip archive", "EOF", "unpickl", "No such file"))
        problem = "cannot be read (a file is torn or missing" if torn else "does not fit this recipe ("
        raise ConfigError("checkpoint.resume", f"{str(directory)!r} {problem}: {msg})",
                          "resume with an intact checkpoint written by the same recipe, or use a new checkpoint.dir") from None


# ------------------------------------------------------------------------- numerical faults
def nonfinite(grad_norm: Any) -> bool:
    """True when the (global) gradient norm is NaN or +-Inf."""
    return not math.isfinite(float(grad_norm))


def skip_step(engine: Any, optimizer: Any) -> int:
    """Drop this step's gradients without touching any state; count it on the engine.
    Returns the engine's running count of skipped steps."""
    optimizer.zero_grad(set_to_none=True)
    engine.skipped_steps = getattr(engine, "skipped_steps", 0) + 1
    return engine.skipped_steps


__all__ = ["data_errors", "check_resume", "load_errors", "nonfinite", "skip_step"]


# ------------------------------------------------------------------------------ dying ranks
def elastic_store(world_size: int, timeout: Any) -> Any:
    """The c10d store for init_process_group after a torchrun restart, or None (use env://).

    torchrun (--max-restarts) restarts every rank after one dies, and its agent keeps hosting
    the same TCPStore: the restarted ranks would read the dead attempt's gloo addresses from it
    ("Connection refused" to the dead rank's port). Keys are therefore namespaced by
    TORCHELASTIC_RESTART_COUNT."""
    import os

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/galore_ds/attempt_{attempt}", store)
