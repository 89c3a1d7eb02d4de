"""DeepSpeed ZeRO 0/1/2/3 GaLore: registration, exactness vs single-process GaLoreAdamW,
collectives between refreshes, checkpoints, and both launchers (deepspeed, mpirun).

One launch per world size runs every case (tests/dist/ds_cases.py); the tests read its JSON.
Run: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_deepspeed*.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from netutil import free_port
import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "dist" / "ds_cases.py"
BIN = Path(sys.executable).parent
TOL = 1e-5

deepspeed = pytest.importorskip("deepspeed")


def _env():
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(cmd: list[str], out: Path, timeout: int = 400, env: dict | None = None) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"{' '.join(cmd)} failed (rc={proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _deepspeed_run(world: int, tmp: Path, *args: str) -> dict:
    out = tmp / f"ds_w{world}.json"
    launcher = BIN / "deepspeed"
    port = str(29500 + 17 * world + os.getpid() % 1000)
    return _launch([str(launcher), "--num_gpus", str(world), "--master_port", port, str(CASES),
                    "--out", str(out), *args], out)


@pytest.fixture(scope="module")
def convert_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def world2(tmp_path_factory, convert_dir):
    return _deepspeed_run(2, tmp_path_factory.mktemp("w2"), "--even", "--clip", "0.05",
                          "--checkpoint", "--variants", "--bf16", "--fp16", "--subgroups",
                          "--nonfinite", "--convert-save", str(convert_dir))


@pytest.fixture(scope="module")
def world3(tmp_path_factory, world2, convert_dir):
    return _deepspeed_run(3, tmp_path_factory.mktemp("w3"), "--checkpoint",
                          "--convert-load", str(convert_dir))


def _check_run(res: dict, world: int) -> list[dict]:
    assert res["world"] == world
    errors = [e for r in res["per_rank"] for e in r["errors"]]
    assert not errors, "\n".join(e["trace"] for e in errors)
    return [c for r in res["per_rank"] for c in r["cases"]]


BF16_TOL = 1e-2  # bf16 forward/backward vs the fp32 single-process reference (5 steps)
FP16_TOL = 2e-3  # fp16 (10 mantissa bits) forward/backward, same reference


def _check_cases(cases: list[dict]) -> None:
    for c in cases:
        if c.get("bf16") or c.get("fp16"):
            continue
        tag = f"ZeRO-{c['stage']} world {c['world']} gas {c['gas']} {c['model']} {c['optimizer']} clip {c['clip']}"
        assert c["bound_stage"] == c["stage"], tag
        assert len(c["refresh_steps"]) >= 2, tag
        assert c["max_rel"] < TOL, f"{tag}: max rel diff {c['max_rel']} (per step {c['rel_per_step']})"
        # between refreshes: DeepSpeed's own collectives, plus one tiny all_reduce per flat
        # tensor whose GaLore matrices have rows cut by a rank boundary (none at ZeRO-0)
        assert c["extra_calls_between_refreshes"] == [c["split_row_flats"]] * len(
            c["extra_calls_between_refreshes"]), tag
        if c["stage"] == 0 or c["model"] == "even":
            assert c["split_row_flats"] == 0, tag


def test_registration_json_names():
    import galore_ds
    from galore_ds.distributed import deepspeed as dsg

    assert torch.optim.GaLoreAdamW is dsg.DeepSpeedGaLoreAdamW
    assert torch.optim.GaLoreAdamW8bit is dsg.DeepSpeedGaLoreAdamW8bit
    assert torch.optim.GaLoreAdafactor is dsg.DeepSpeedGaLoreAdafactor
    assert issubclass(torch.optim.GaLoreAdamW, galore_ds.GaLoreAdamW)
    assert dsg.register()
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
    assert dsg.DeepSpeedGaLoreAdamW in ZERO_SUPPORTED_OPTIMIZERS


def test_json_only_config_any_import_order(tmp_path):
    """import galore_ds before deepspeed; plain deepspeed.initialize(model.parameters()) with
    the JSON optimizer binds at every stage and equals the unbound optimizer; the
    galore_ds.deepspeed.initialize wrapper picks GaLore matrices by module name."""
    out = tmp_path / "json.json"
    port = str(free_port())
    res = _launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port,
                   str(ROOT / "tests" / "dist" / "ds_json_only.py"), "--out", str(out)], out)
    assert [c["stage"] for c in res["cases"]] == [0, 1, 2, 3]
    for c in res["cases"]:
        assert c["cls"] == "DeepSpeedGaLoreAdamW" and c["bound"] == c["stage"], c
        assert c["refreshes"] > 0 and c["max_rel"] < TOL, c
    w = res["wrapper"]
    assert w["bound"] == 2 and w["groups"] == ["galore", "decay", "no_decay"]
    assert len(w["galore_keys"]) == 2  # w1, w2 only (w3 is 2-D but not targeted)


def test_json_params_split_plain_parameters():
    """DeepSpeed passes model.parameters(): rank in the JSON params makes a GaLore group of
    the 2-D params with min(shape) >= rank; the rest train full-rank (1-D without decay)."""
    from torch import nn
    from galore_ds.distributed.deepspeed import DeepSpeedGaLoreAdamW

    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 3))
    opt = DeepSpeedGaLoreAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, rank=4,
                               update_proj_gap=10, scale=0.5, proj_type="right")
    g0, g1, g2 = opt.param_groups
    assert [tuple(p.shape) for p in g0["params"]] == [(12, 16)]
    assert g0["rank"] == 4 and g0["update_proj_gap"] == 10 and g0["scale"] == 0.5
    assert "rank" not in g1 and [tuple(p.shape) for p in g1["params"]] == [(3, 12)]
    assert g2["weight_decay"] == 0.0 and all(p.dim() == 1 for p in g2["params"])
    # no DeepSpeed: behaves like the core optimizer
    x = torch.randn(5, 16)
    model(x).sum().backward()
    opt.step()
    assert opt.galore_stats["refreshes"] == 1


def test_world2_all_stages_exact(world2):
    cases = _check_run(world2, 2)
    seen = {(c["stage"], c["gas"], c["model"], c["optimizer"], c["clip"]) for c in cases}
    for stage in (0, 1, 2, 3):
        for gas in (1, 4):
            assert (stage, gas, "odd", "GaLoreAdamW", 0.0) in seen
        assert (stage, 1, "even", "GaLoreAdamW", 0.0) in seen
        assert (stage, 1, "odd", "GaLoreAdamW", 0.05) in seen
    assert (0, 1, "odd", "GaLoreAdamW8bit", 0.0) in seen
    sub = [c for c in cases if c.get("sub_group_size")]
    assert sub and all(c["flats"] > 3 for c in sub)  # several ZeRO-3 sub-groups per group
    assert (0, 1, "odd", "GaLoreAdafactor", 0.0) in seen
    _check_cases(cases)
    # ZeRO-3 with uneven chunks really exercised the split-row path, and the even model none
    odd3 = [c for c in cases if c["stage"] == 3 and c["model"] == "odd"]
    assert all(c["split_row_flats"] >= 1 for c in odd3)


def test_world2_bf16_all_stages(world2):
    """bf16 weights with fp32 masters at ZeRO 0 (FP16_UnfusedOptimizer), 1 (BF16_Optimizer,
    fp32 grad accumulation), 2 and 3: within BF16_TOL of the fp32 reference, and the fp32
    master weights of all four stages agree to 1e-5 (the sharding itself adds no error)."""
    _check_run(world2, 2)
    cases = [c for c in world2["per_rank"][0]["cases"] if c.get("bf16")]
    assert sorted(c["stage"] for c in cases) == [0, 1, 2, 3]
    assert {c["stage"]: c["wrapper"] for c in cases}[1] == "BF16_Optimizer"
    finals = {c["stage"]: torch.tensor(c["final"]) for c in cases}
    for c in cases:
        assert c["bound_stage"] == c["stage"]
        assert c["max_rel"] < BF16_TOL, c["rel_per_step"]
        d = float((finals[c["stage"]] - finals[0]).norm() / finals[0].norm())
        assert d < TOL, f"bf16 ZeRO-{c['stage']} vs ZeRO-0: {d}"
        assert c["extra_calls_between_refreshes"] == [c["split_row_flats"]] * len(
            c["extra_calls_between_refreshes"])


def test_world2_fp16_loss_scaling_stages_1_to_3(world2):
    """fp16 weights with dynamic loss scaling at ZeRO 1, 2, 3: the loss scale is undone before
    GaLore sees a gradient (within FP16_TOL of the fp32 reference), no step overflows, and
    between refreshes no collective beyond DeepSpeed's own (plus split rows)."""
    _check_run(world2, 2)
    cases = [c for c in world2["per_rank"][0]["cases"] if c.get("fp16")]
    assert sorted(c["stage"] for c in cases) == [1, 2, 3]
    for c in cases:
        assert c["bound_stage"] == c["stage"] and c["skipped_steps"] == 0, c
        assert c["max_rel"] < FP16_TOL, c["rel_per_step"]
        assert c["extra_calls_between_refreshes"] == [c["split_row_flats"]] * len(
            c["extra_calls_between_refreshes"])


def test_world2_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(world2):
    """+Inf in one gradient element on the last rank only, at every stage, in fp32 (gas 1 and
    4), bf16 and fp16 (loss-scale overflow): weights, moments, projectors and step counts are
    bit-identical before and after on every rank, DeepSpeed counts one skipped step, and the
    following steps equal the single-process optimizer that never saw that step. fp32 ZeRO-0
    is the optimizer's own check (DeepSpeed has no wrapper there); the rest is DeepSpeed's."""
    _check_run(world2, 2)
    tol = {"fp32": TOL, "bf16": BF16_TOL, "fp16": FP16_TOL}
    per_rank = [r["nonfinite"] for r in world2["per_rank"]]
    seen = {(c["precision"], c["stage"], c["gas"]) for c in per_rank[0]}
    assert seen == ({("fp32", s, g) for s in range(4) for g in (1, 4)}
                    | {(p, s, 1) for p in ("bf16", "fp16") for s in range(4)})
    for rank_cases in per_rank:
        for c in rank_cases:
            tag = f"{c['precision']} ZeRO-{c['stage']} gas {c['gas']} ({c['wrapper']})"
            assert c["unchanged"] == {"weights": True, "optimizer_state": True}, tag
            assert c["skipped"] == 1, tag
            assert c["galore_steps"] == [4], tag  # 5 steps, one skipped
            if (c["precision"], c["stage"]) != ("fp16", 0):  # DeepSpeed PR #8393, see config.py
                assert c["max_rel"] < tol[c["precision"]], f"{tag}: {c['max_rel']}"


def test_world2_checkpoint_resume_bit_identical(world2):
    ckpts = [c for r in world2["per_rank"] for c in r["checkpoints"]]
    assert sorted({c["stage"] for c in ckpts}) == [0, 1, 2, 3]
    for c in ckpts:
        assert c["max_abs_diff"] == 0.0, c


def test_world3_all_stages_gas_exact(world3):
    cases = _check_run(world3, 3)
    assert {(c["stage"], c["gas"]) for c in cases} == {(s, g) for s in range(4) for g in (1, 4)}
    _check_cases(cases)
    for c in [c for r in world3["per_rank"] for c in r["checkpoints"]]:
        assert c["max_abs_diff"] == 0.0, c


def test_resume_world2_to_world3(world3):
    """GaLore state saved as world-size-free pieces on 2 ranks (save_state_pieces), loaded on 3
    ranks (load_state_pieces) at ZeRO 1, 2, 3 and across stages (1 -> 3): the continued run
    equals the single-process run that saw the same global batches."""
    conv = world3["per_rank"][0]["convert"]
    assert {(c["saved_stage"], c["stage"]) for c in conv} == {(1, 1), (2, 2), (3, 3), (1, 3)}
    for c in conv:
        assert c["from_world"] == 2 and c["world"] == 3
        assert c["max_rel"] < TOL, c


@pytest.mark.skipif(not (BIN / "mpirun").exists(), reason="no mpirun next to the interpreter")
def test_mpirun_launcher(tmp_path):
    out = tmp_path / "mpi.json"
    res = _launch([str(BIN / "mpirun"), "-n", "2", sys.executable, str(CASES), "--out", str(out),
                   "--stages", "0,3", "--gas", "1"], out, timeout=300,
                  env={"GALORE_DS_PORT": str(free_port())})
    cases = _check_run(res, 2)
    assert {c["stage"] for c in cases} == {0, 3}
    _check_cases(cases)


def test_two_nodes_on_one_machine_hostfile_no_ssh(tmp_path):
    """Multi-node rendezvous as on a cluster without ssh between launchers: one hostfile with
    two nodes, one `deepspeed --no_ssh --node_rank K` launcher per node (here both on
    127.0.0.1), one rank each. The ranks meet, and ZeRO-0 and ZeRO-2 stay exact."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out, port = tmp_path / "nodes.json", str(free_port())
    procs = [subprocess.Popen([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
                               "--node_rank", str(k), "--master_addr", "127.0.0.1", "--master_port", port,
                               str(CASES), "--out", str(out), "--stages", "0,2", "--gas", "1"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for k in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for k, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, log[-4000:]
        assert f"nnodes=2, num_local_procs=1, node_rank={k}" in log, log[-4000:]
    res = json.loads(out.read_text())
    cases = _check_run(res, 2)
    assert {c["stage"] for c in cases} == {0, 2}
    _check_cases(cases)
