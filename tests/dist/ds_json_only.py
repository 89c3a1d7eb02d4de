"""The JSON-only path: `import galore_ds` BEFORE deepspeed, plain deepspeed.initialize with
model.parameters() and "optimizer": {"type": "GaLoreAdamW", "params": {..., "rank": 4}}.
Every stage must bind, and match the same optimizer run single-process (unbound) in-rank.
Also galore_ds.deepspeed.initialize (groups by module name). Rank 0 writes JSON to --out."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import galore_ds  # noqa: E402,F401  (first on purpose: the hooks must still get installed)
import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ds_cases as C  # noqa: E402
from shutdown import exit_worker  # noqa: E402
from galore_ds.distributed.deepspeed import DeepSpeedGaLoreAdamW  # noqa: E402

GALORE = dict(rank=4, update_proj_gap=2, proj_type="right")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {"cases": []}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = C.Tiny()
        ref = copy.deepcopy(model)
        cfg = C.ds_config(stage, 1, world)
        cfg["optimizer"]["params"].update(GALORE)
        eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        ref_opt = DeepSpeedGaLoreAdamW(ref.parameters(), lr=C.LR, weight_decay=C.WD, **GALORE)
        errs = []
        for step in range(4):
            C.ds_train_step(eng, step, 1, world, rank)
            C.ref_train_step(ref, ref_opt, step, 1, world, 0.0)
            errs.append(C.rel(C.full_params(eng), dict(ref.named_parameters())))
        opt = eng.basic_optimizer
        out["cases"].append({"stage": stage, "cls": type(opt).__name__, "bound": opt._ds_stage,
                             "max_rel": max(errs), "refreshes": opt.galore_stats["refreshes"]})
    # the wrapper: GaLore group by module name (target_modules), not by shape
    import galore_ds.deepspeed as gds
    torch.manual_seed(0)
    model = C.Tiny()
    cfg = C.ds_config(2, 1, world)
    cfg["optimizer"]["params"].update(GALORE, target_modules=["w1", "w2"])
    eng, *_ = gds.initialize(model=model, config=cfg)
    C.ds_train_step(eng, 0, 1, world, rank)
    opt = eng.basic_optimizer
    out["wrapper"] = {"groups": [g.get("name") for g in opt.param_groups],
                      "galore_keys": sorted(k for k in opt.state if isinstance(k, str) and k.startswith("galore_ds:0:")),
                      "bound": opt._ds_stage}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)
    dist.barrier()
    exit_worker()


if __name__ == "__main__":
    main()
