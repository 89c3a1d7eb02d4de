"""The public optimizers in a user's own FSDP2/HSDP code equal one process (gloo, 2, 3 and 4
ranks; at 4 a 5-row matrix is split 2,2,1,0). One process group per world size runs every
case (tests/dist/fsdp_cases.py); each case asserts inside the ranks, this file checks the
per-rank reports."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ranks import launch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "fsdp_cases.py"
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from fsdp_cases import CASES, FACTORS, PAIRWISE  # noqa: E402

_CACHE: dict = {}


def results(world: int, tmp_path_factory) -> dict:
    """Every case on `world` ranks, once per session. The 3-rank run loads what the 2-rank run
    saved (DCP resharding 2 -> 3)."""
    if world not in _CACHE:
        if world == 3:
            results(2, tmp_path_factory)
        ckpt = _CACHE.setdefault("ckpt", str(tmp_path_factory.mktemp("dcp") / "ckpt"))
        out = tmp_path_factory.mktemp(f"fsdp{world}") / "results.json"
        _CACHE[world] = launch(world, WORKER, ["--ckpt", ckpt], out)
    return _CACHE[world]


ONLY_ON = {"hsdp": 4, "refuses": 4, "dcp_save": 2, "dcp_load": 3}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_case(world, case, tmp_path_factory):
    report = results(world, tmp_path_factory)
    for rank, res in enumerate(report["ranks"]):
        r = res[case]
        assert r["ok"], f"rank {rank}: {r.get('error')}\n{r.get('trace')}"
    r = report["ranks"][0][case]
    skipped = "skipped" in r
    if case.startswith("ckpt_"):   # tests/dist/checkpoint_paths_worker.py: saved on 2, loaded on 2 and 3
        assert skipped == (world == 4), r
        if world == 2 and case.rsplit("_", 1)[-1] in ("exact", "delayed"):
            assert r["bit_identical"], r   # same world size: bit-identical
        if world == 3 and case.startswith("ckpt_per_rank"):
            assert "\n" not in r["refused"] and "dcp" in r["refused"], r
        return
    only = next((w for key, w in ONLY_ON.items() if key in case), None)
    assert skipped == (only is not None and only != world), r


def test_pairwise_cases_cover_every_pair():
    import pairwise

    assert pairwise.uncovered(FACTORS, PAIRWISE) == []
    # no pairwise cover is smaller than its two largest factors' product (6 optimizers x 4 sides)
    assert len(PAIRWISE) <= len(FACTORS["opt"]) * len(FACTORS["proj"]) + 2


def test_checkpoint_path_cases_cover_every_pair():
    """path x optimizer x clip timing, pairwise in the suite (each case on 2 ranks and 3);
    benchmarks/checkpoint_paths.py runs the full product."""
    import checkpoint_paths_worker as ck
    import pairwise

    assert pairwise.uncovered(ck.FACTORS, ck.PAIRWISE) == []
    assert len(ck.PAIRWISE) == len(ck.PATHS) * len(ck.OPTIMIZERS)


def test_one_rank_holds_no_rows_at_four_and_still_steps(tmp_path_factory):
    report = results(4, tmp_path_factory)
    rows = [r["layout_of_each_parameter"]["mlp_down.weight"]["rows"] for r in report["ranks"]]
    assert [hi - lo for lo, hi in rows] == [2, 2, 1, 0]
    assert all(r["layout_of_each_parameter"]["ok"] for r in report["ranks"])


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["GaLoreAdamW", "GaLoreAdafactor"])
def test_torch_checkpoint_api_resumes_a_users_fsdp2_run_bit_identically(tmp_path, optimizer):
    """The public class in a user's FSDP2 code, checkpointed the way torch documents it:
    get_optimizer_state_dict + dcp.save, then set_optimizer_state_dict after dcp.load, on 2 ranks.
    Each rank's rows of the low-rank moments go out as DTensor blocks (plain tensors were saved
    from one rank only: the resume was 10% off)."""
    import fsdp_checkpoint_worker

    result = fsdp_checkpoint_worker.run(tmp_path, "torch", optimizer)
    assert result["dtensor_params"], result
    assert result["rel_diff_vs_plain"] <= 1e-5, result
    assert result["resume_bit_identical"], result
