"""Checkpoints: <checkpoint.dir>/step-0000123/{engine files, trainer.pt, rng-rank*.pt}.

Atomic: everything is written into .tmp-step-0000123, flushed to disk (fsync), and renamed
once all ranks are done, so a crash (or a power loss) mid-save never leaves a directory that
looks complete; `latest` is a one-line file replaced atomically. Loop state (step, data
position, RNG) is stored here; model, optimizer and scheduler by the engine. All files load with torch.load(weights_only=True)."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from galore_ds.train.engines.base import Engine


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
          "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((st["python_version"], tuple(st["python"]), st["python_gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def save(root: Path, step: int, engine: Engine, trainer_state: dict[str, Any], keep_last: int = 0) -> Path:
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".tmp-step-{step:07d}"
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in root.glob(".trash-*"):  # left by a save killed while deleting
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng-rank{engine.rank}.pt")
    if engine.is_main:
        torch.save(trainer_state, tmp / "trainer.pt")
    engine.barrier()
    if engine.dist.local_rank == 0:  # one per node: node-local disks hold only their files
        _fsync_tree(tmp)  # on disk before the rename declares them complete
    engine.barrier()
    if engine.is_main:
        if final.exists():
            _discard(final)  # renamed away first: a kill never leaves a half-deleted step-*
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        with open(latest_tmp, "w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)  # the renames themselves
        rotate(root, step, keep_last)
    engine.barrier()
    return final


def rotate(root: Path, step: int, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `step` (the one just written among them).

    Checkpoints AFTER `step` belong to a run this one resumed before its end: they are left
    alone (deleting data is never a side effect of saving; `latest` names the new one), and
    this run replaces each when it saves that step again."""
    if keep_last <= 0:
        return
    mine = [p for p in sorted(Path(root).glob("step-*")) if _step_of(p) is not None and _step_of(p) <= step]
    for old in mine[:-keep_last]:
        _discard(old)


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name[len("step-"):])
    except ValueError:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file (any rank's: on one node the page cache is shared) and directory."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _discard(path: Path) -> None:
    """Delete a step directory: an atomic rename out of the step-* namespace, then rmtree."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def resolve(root: Path, resume: str) -> Optional[Path]:
    """'latest' -> the directory named in <root>/latest (None if there is none); else the path.
    If a save was killed between replacing a step directory and rewriting `latest`, the newest
    complete step-* directory (all of them are: they only appear by an atomic rename) is used."""
    if resume != "latest":
        return Path(resume)
    marker = Path(root) / "latest"
    named = Path(root) / marker.read_text().strip() if marker.exists() else None
    if named is not None and (named / "trainer.pt").is_file():
        return named
    complete = [p for p in sorted(Path(root).glob("step-*")) if (p / "trainer.pt").is_file()]
    return complete[-1] if complete else named


def load(directory: Path, engine: Engine) -> dict[str, Any]:
    """Restore the engine and this rank's RNG; returns the trainer state."""
    directory = Path(directory)
    engine.load(directory)
    rng = directory / f"rng-rank{engine.rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))
    return torch.load(directory / "trainer.pt", weights_only=True)
