"""Data parallelism that sends low-rank gradients (engine.mode=ddp, galore_ds.lowrank_comm_hook):
exact against one process and against plain DDP on 2, 3 and 4 ranks (tests/dist/ddp_cases.py),
the engine through launch/train.py, and elastic restarts under torchrun."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_fsdp import launch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "ddp_cases.py"
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from ddp_cases import CASES  # noqa: E402

_CACHE: dict = {}


def results(world: int, tmp_path_factory) -> dict:
    if world not in _CACHE:
        out = tmp_path_factory.mktemp(f"ddp{world}") / "results.json"
        _CACHE[world] = launch(world, WORKER, [], out)
    return _CACHE[world]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_case(world, case, tmp_path_factory):
    for rank, res in enumerate(results(world, tmp_path_factory)["ranks"]):
        r = res[case]
        assert r["ok"], f"rank {rank}: {r.get('error')}\n{r.get('trace')}"
