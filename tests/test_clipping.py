"""Every clipping idiom x every data-parallel form on 2 gloo ranks, in one process group
(tests/dist/clip_cases.py): equal to one process with the same clipping, or refused on every
rank with one line naming the idiom that works. The rows that can be neither, clip_grad_norm_
in per-layer mode without a reduce_group (gradients are freed inside backward: it finds none
and clips nothing, which nothing can notice), are asserted as the docs describe them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ranks import launch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "clip_cases.py"
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from clip_cases import CASES, EXPECTED, FORMS, IDIOMS, INNER_ROWS  # noqa: E402

_CACHE: dict = {}


def results(tmp_path_factory) -> dict:
    if "r" not in _CACHE:
        out = tmp_path_factory.mktemp("clip2") / "results.json"
        _CACHE["r"] = launch(2, WORKER, [], out)
    return _CACHE["r"]


def _ranks(tmp_path_factory, case: str) -> list[dict]:
    report = results(tmp_path_factory)["ranks"]
    for rank, res in enumerate(report):
        r = res[case]
        assert r["ok"], f"rank {rank}: {r.get('error')}\n{r.get('trace')}"
    return [res[case] for res in report]


@pytest.mark.slow
def test_clip_grad_norm_with_lowrank_comm_hook_is_refused_on_every_rank(tmp_path_factory):
    """Issue 21 finding 1: DDP + lowrank_comm_hook + clip_grad_norm_(ddp.parameters(), 0.05)."""
    ranks = _ranks(tmp_path_factory, "finding1_clip_grad_norm_with_comm_hook")
    assert {r["refused_at_step"] for r in ranks} == {0}
    assert len({r["message"] for r in ranks}) == 1


@pytest.mark.slow
def test_clip_grad_norm_that_scales_nothing_runs_as_plain_ddp_with_the_hook(tmp_path_factory):
    _ranks(tmp_path_factory, "clip_grad_norm_that_never_clips_runs_as_plain_ddp_with_the_hook")


@pytest.mark.slow
def test_one_rank_clipping_refuses_every_rank_without_deadlock(tmp_path_factory):
    ranks = _ranks(tmp_path_factory, "only_one_rank_clips_and_every_rank_refuses")
    assert sorted(r["clipped_here"] for r in ranks) == [False, True]


@pytest.mark.slow
def test_every_idiom_clips_in_the_references(tmp_path_factory):
    _ranks(tmp_path_factory, "references_clip")


@pytest.mark.slow
@pytest.mark.parametrize("idiom", IDIOMS)
@pytest.mark.parametrize("form", FORMS)
def test_clipping_idiom_on_data_parallel_form(form, idiom, tmp_path_factory):
    ranks = _ranks(tmp_path_factory, f"row_{form}_x_{idiom}")
    assert {r["outcome"] for r in ranks} == {EXPECTED[(form, idiom)]}
    if EXPECTED[(form, idiom)] == "refused":
        assert len({r["at_step"] for r in ranks}) == 1, ranks   # every rank, at the same step
        assert len({r["message"] for r in ranks}) == 1, ranks


@pytest.mark.slow
def test_per_layer_replicated_refuses_every_rank_when_one_ranks_gradient_changed(tmp_path_factory):
    ranks = _ranks(tmp_path_factory, "per_layer_replicated_gradient_changed_on_one_rank")
    assert sorted(r["changed_here"] for r in ranks) == [False, True]
    assert len({r["message"] for r in ranks}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("form,idiom", INNER_ROWS)
def test_per_layer_wrapper_clips_with_its_optimizers_max_grad_norm(form, idiom, tmp_path_factory):
    ranks = _ranks(tmp_path_factory, f"row_{form}_x_{idiom}_on_the_optimizer")
    assert {r["outcome"] for r in ranks} == {"exact"}


@pytest.mark.slow
def test_per_layer_refuses_two_different_clippings(tmp_path_factory):
    _ranks(tmp_path_factory, "per_layer_refuses_two_different_clippings")


@pytest.mark.slow
def test_per_layer_with_accumulation_refuses_clip_grad_norm_(tmp_path_factory):
    _ranks(tmp_path_factory, "per_layer_with_accumulation_refuses_clip_grad_norm_")


@pytest.mark.slow
def test_per_layer_fsdp2_with_accumulation_refuses_clip_grad_norm_(tmp_path_factory):
    _ranks(tmp_path_factory, "per_layer_fsdp2_with_accumulation_refuses_clip_grad_norm_")


def test_every_row_is_run():
    assert {f"row_{f}_x_{i}" for f in FORMS for i in IDIOMS} <= set(CASES)
