#!/usr/bin/env python
"""One entry for every launcher:

    python launch/train.py --config configs/tiny.json
    torchrun --nproc_per_node 2 launch/train.py --config configs/60m.json
    deepspeed --num_gpus 8 launch/train.py --config configs/7b.json
    mpirun -n 2 python launch/train.py --config configs/60m.json

The recipe is validated before torch is imported; a bad recipe or flag exits with code 2
and one line `error: <key>: <problem>; <fix>` on stderr, writing nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_config_module():
    """galore_ds.train.config without importing the galore_ds package (whose __init__ imports torch):
    validation must answer in well under a second."""
    if "galore_ds.train.config" in sys.modules:
        return sys.modules["galore_ds.train.config"]
    spec = importlib.util.spec_from_file_location("galore_ds.train.config", ROOT / "galore_ds" / "train" / "config.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["galore_ds.train.config"] = mod  # the package import later reuses this very module
    spec.loader.exec_module(mod)
    return mod


#: how long a rank other than 0 waits before it prints its error and exits (seconds)
OTHER_RANK_GRACE_S = 5.0


def fail(message: str, rank: int = 0) -> "NoReturn":  # noqa: F821
    """Print one line and exit 2.

    Every rank usually finds the same problem, and one line is enough: rank 0 prints it at once.
    Another rank waits first, because a launcher (deepspeed, torchrun, mpirun) kills every rank
    as soon as one exits non-zero: had it exited at once, rank 0 could be killed before printing.
    If it is still alive after the wait, rank 0 did not fail the same way (the problem is this
    rank's own), so it prints the line itself, naming its rank."""
    if rank != 0:
        import time

        time.sleep(OTHER_RANK_GRACE_S)
        message = f"{message} (rank {rank})"
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> "NoReturn":  # noqa: F821
        fail(f"arguments: {message}; see --help")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description="GaLore LLaMA pre-training (one recipe for python, torchrun, deepspeed, mpirun)")
    p.add_argument("--config", required=True, help="JSON recipe, e.g. configs/tiny.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set training.lr=0.005 (repeatable; value is JSON or a string)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from the latest checkpoint (or the given step-* directory)")
    p.add_argument("--check", action="store_true", help="validate the recipe, print it resolved, and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # added by the deepspeed launcher; the env has it too
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C = _load_config_module()
    overrides = list(args.set) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    dist = C.DistEnv()
    try:
        dist = C.dist_env()
        cfg = C.load_config(args.config, overrides, dist)
    except C.ConfigError as e:
        fail(str(e), dist.rank)
    if args.check:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return 0

    # ---- heavy imports from here on ----
    sys.path.insert(0, str(ROOT))
    from galore_ds.train.engines.base import EngineUnavailable, make_engine

    try:
        engine = make_engine(cfg, dist)
    except (EngineUnavailable, C.ConfigError) as e:
        fail(str(e), dist.rank)
    from galore_ds.train.trainer import train

    try:
        summary = train(cfg, dist, engine)
    except C.ConfigError as e:  # bad data / checkpoint found while starting (galore_ds/train/faults.py)
        fail(str(e), dist.rank)
    except KeyboardInterrupt:
        return 130
    engine.close()  # only after success: a rank that failed must not wait in a teardown
    if dist.rank == 0:
        import math

        evaluated = f", eval loss {summary['eval_loss']:.4f}" if math.isfinite(summary["eval_loss"]) else ""
        print(f"done: step {summary['step']}, loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
              f"{evaluated}, {summary['wall_s']:.1f}s", flush=True)
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
