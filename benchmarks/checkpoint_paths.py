"""Every checkpoint path x optimizer x clip timing x world size: the full product (CI runs
the pairwise cover as the ckpt_* cases of tests/test_fsdp.py).

    python benchmarks/checkpoint_paths.py

Saves on 2 FSDP2 gloo ranks and resumes on 2 (bit-identical) and on 3 (within 1e-5 of one
process, GaLoreAdamW8bit within its stated 1e-2; a per-rank state_dict() refused with one
line), with tests/dist/checkpoint_paths_worker.py. Writes
benchmarks/results/checkpoint_paths.json: every case's verdict on each world size.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from ranks import launch  # noqa: E402

WORKER = ROOT / "tests" / "dist" / "checkpoint_paths_worker.py"


def main() -> None:
    started = time.time()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (2, 3):
            report = launch(world, WORKER, ["--ckpt", tmp + "/ckpt"], Path(tmp) / f"r{world}.json", timeout=1800)
            for name, r in report["ranks"][0].items():
                ok = all(rr[name]["ok"] for rr in report["ranks"])
                verdict = {k: v for k, v in r.items() if k not in ("ok", "trace")}
                if not ok:
                    verdict["error"] = next(rr[name]["error"] for rr in report["ranks"] if not rr[name]["ok"])
                results.setdefault(name, {})[f"world{world}"] = {"ok": ok, **verdict}
    failed = [n for n, r in results.items() if not all(v["ok"] for v in r.values())]
    out = {"cases": len(results), "failed": failed, "seconds": round(time.time() - started, 1), "results": results}
    path = ROOT / "benchmarks" / "results" / "checkpoint_paths.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"{len(results)} cases, {len(failed)} failed ({out['seconds']} s): {path}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
