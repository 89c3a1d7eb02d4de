"""All-pairs covering arrays: every pair of values of any two factors appears in some case.

    cases(dict(engine=["single", "fsdp"], optimizer=["adamw", "adafactor"], accum=[1, 2]))

Greedy and deterministic (the same list on every rank and every run): each new case is the
candidate covering the most uncovered pairs, candidates built factor by factor. A `valid`
predicate drops combinations the caller cannot run; pairs no valid case can cover are
reported by `uncovered` so a test can assert there are none it did not mean to skip.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Sequence


def _pairs(factors: Mapping[str, Sequence[Any]]) -> set[tuple]:
    names = list(factors)
    return {(a, i, b, j) for a, b in itertools.combinations(names, 2)
            for i in range(len(factors[a])) for j in range(len(factors[b]))}


def _covered(case: dict[str, int], names: list[str]) -> set[tuple]:
    return {(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)}


def cases(factors: Mapping[str, Sequence[Any]],
          valid: Callable[[dict[str, Any]], bool] = lambda c: True) -> list[dict[str, Any]]:
    """A list of cases (dicts factor -> value) covering every valid pair."""
    names = list(factors)
    todo = _pairs(factors)
    out: list[dict[str, int]] = []

    def ok(idx: dict[str, int]) -> bool:
        return valid({k: factors[k][v] for k, v in idx.items()})

    while todo:
        best, gain = None, 0
        for a, i, b, j in sorted(todo):  # seed a candidate from each uncovered pair
            idx = {a: i, b: j}
            for n in names:
                if n in idx:
                    continue
                options = sorted(range(len(factors[n])),
                                 key=lambda v: -len(_covered({**idx, n: v}, [m for m in names if m in idx or m == n]) & todo))
                for v in options:
                    trial = {**idx, n: v}
                    if all(k in trial for k in names) and not ok(trial):
                        continue
                    idx = trial
                    break
                else:
                    idx = None
                    break
            if idx is None or len(idx) < len(names) or not ok(idx):
                idx = _first_valid(factors, names, {a: i, b: j}, ok)
                if idx is None:
                    continue
            g = len(_covered(idx, names) & todo)
            if g > gain:
                best, gain = idx, g
        if best is None:
            break  # what is left cannot be covered by any valid case
        out.append(best)
        todo -= _covered(best, names)
    return [{k: factors[k][v] for k, v in c.items()} for c in out]


def _first_valid(factors, names, fixed: dict[str, int], ok) -> dict[str, int] | None:
    """The first valid completion of `fixed` (greedy choices can paint themselves into an
    invalid corner; this finds a case whenever one exists)."""
    rest = [n for n in names if n not in fixed]
    for values in itertools.product(*(range(len(factors[n])) for n in rest)):
        idx = {**fixed, **dict(zip(rest, values))}
        if ok(idx):
            return idx
    return None


def uncovered(factors: Mapping[str, Sequence[Any]], chosen: list[dict[str, Any]],
              valid: Callable[[dict[str, Any]], bool] = lambda c: True) -> list[tuple]:
    """Pairs of values that no case in `chosen` covers (as (factor, value, factor, value))."""
    names = list(factors)
    have = set()
    for c in chosen:
        for a, b in itertools.combinations(names, 2):
            have.add((a, repr(c[a]), b, repr(c[b])))
    return [(a, x, b, y) for a, b in itertools.combinations(names, 2)
            for x in factors[a] for y in factors[b] if (a, repr(x), b, repr(y)) not in have]
