"""The recipe matrix's full product (CI runs the pairwise cover: tests/test_recipe_matrix.py).

    python benchmarks/recipe_matrix.py --count            # what the config accepts and refuses, and why
    python benchmarks/recipe_matrix.py --sample 120       # a seeded uniform sample of them
    python benchmarks/recipe_matrix.py --shard 3/40       # every 40th accepted case from the 3rd

Each accepted case trains 4 steps through launch/train.py's loop (eval and checkpoint at step
2), resumes from step 2 on the same or the other world size, and must log the uninterrupted
run's losses (tests/matrix.py: bit-identical on the same world size; 1e-4, bf16 2e-2, 8-bit 1e-2
on another). Cases are grouped into one process group per launcher and world size. Writes
benchmarks/results/recipe_matrix.json: every case's verdict, and the counts per factor value.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import matrix  # noqa: E402
from netutil import free_port  # noqa: E402


def combinations() -> Iterator[dict]:
    """The full product of the recipe factors, as cases."""
    names = list(matrix.FACTORS)
    return (dict(zip(names, vals)) for vals in itertools.product(*matrix.FACTORS.values()))


def accepted() -> list[dict]:
    """Every combination the config accepts (validation of ~38k recipes: under a minute)."""
    return [c for c in combinations() if matrix.valid(c)]


def refusal_table() -> dict:
    """The whole product through the config's validation: how many combinations are accepted,
    and the refused ones grouped by the one line that refuses them (with a count and an example)."""
    reasons: dict[str, dict] = {}
    accepted_n = total = 0
    for case in combinations():
        total += 1
        refused = matrix.refusal(case)
        if refused is None:
            accepted_n += 1
            continue
        world, line = refused
        entry = reasons.setdefault(line, {"refused": 0, "example": {**case, "refused_at_world": world}})
        entry["refused"] += 1
    table = sorted(({"error": k, **v} for k, v in reasons.items()), key=lambda r: -r["refused"])
    return {"combinations": total, "accepted": accepted_n, "refused": total - accepted_n, "by_reason": table}


def sample(n: int, seed: int) -> tuple[list[dict], float]:
    """n distinct accepted cases drawn uniformly (rejection sampling from the product), and the
    fraction of draws the config accepted (an estimate of accepted / combinations)."""
    rng, names = random.Random(seed), list(matrix.FACTORS)
    seen, picked, draws = set(), [], 0
    while len(picked) < n:
        vals = tuple(rng.choice(matrix.FACTORS[k]) for k in names)
        draws += 1
        if vals not in seen:
            seen.add(vals)
            case = dict(zip(names, vals))
            if matrix.valid(case):
                picked.append(case)
    return picked, len(picked) / draws


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", action="store_true", help="validate the whole product (no training): "
                   "accepted count and the refusals by reason, to recipe_matrix_refusals.json")
    p.add_argument("--sample", type=int, help="run a seeded uniform sample of this many cases")
    p.add_argument("--shard", help="i/n: run every n-th accepted case from the i-th")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipe_matrix.json"))
    args = p.parse_args()
    total = 1
    for values in matrix.FACTORS.values():
        total *= len(values)
    if args.count:
        table = refusal_table()
        out = Path(args.out).with_name("recipe_matrix_refusals.json")
        out.write_text(json.dumps(table, indent=1, default=str) + "\n")
        print(f"{table['accepted']} of {table['combinations']} combinations are accepted by the config; "
              f"{table['refused']} refused for {len(table['by_reason'])} reasons; wrote {out}")
        return 0
    if args.sample:
        cases, rate = sample(args.sample, args.seed)
        count = f"~{rate * total:.0f} (estimated from the sample's draws)"
    else:
        cases = accepted()
        count = str(len(cases))
        if args.shard:
            i, n = (int(x) for x in args.shard.split("/"))
            cases = cases[i::n]
    print(f"{count} of {total} combinations are accepted by the config", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root, results = Path(tmp), {}
        for kind, world, jobs in matrix.plan(cases, root / "runs", root / "cache"):
            print(f"{kind} x{world}: {len(jobs)} jobs", flush=True)
            results.update(matrix.launch(kind, world, jobs, root / "launch", free_port(), timeout=6 * 3600))
    verdicts = []
    for case in cases:
        name = matrix.case_name(case)
        run, resume = results.get(f"{name}/run"), results.get(f"{name}/resume")
        if not (run and resume and run.get("ok") and resume.get("ok")):
            error = (run or {}).get("error") or (resume or {}).get("error") or "did not run"
            verdicts.append({**case, "ok": False, "detail": str(error)[:300]})
            continue
        ok, worst, detail = matrix.compare(case, run, resume)
        verdicts.append({**case, "ok": ok, "worst_rel_loss_diff": worst, "detail": detail})
    by_value = {k: {str(v): [sum(1 for c in verdicts if c[k] == v and c["ok"]),
                             sum(1 for c in verdicts if c[k] == v)] for v in values}
                for k, values in matrix.FACTORS.items()}
    doc = {"accepted": count, "combinations": total, "ran": len(verdicts),
           "passed": sum(c["ok"] for c in verdicts), "selection": vars(args),
           "wall_s": round(time.perf_counter() - started, 1),
           "passed_of_ran_by_factor_value": by_value,
           "failures": [c for c in verdicts if not c["ok"]], "cases": verdicts}
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"{doc['passed']}/{doc['ran']} passed in {doc['wall_s']} s; wrote {args.out}")
    for c in doc["failures"][:20]:
        print("FAIL", matrix.case_name(c), c["detail"])
    return 0 if not doc["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
