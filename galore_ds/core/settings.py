"""The GaLore options and their defaults, written once.

Every entry point reads its defaults from `GaLoreSettings`: `param_groups` and the optimizers
(core/groups.py: GALORE_GROUP_DEFAULTS, GALORE_OPTION_DEFAULTS), the recipe's `galore` section
(train/config.py), the Hugging Face Trainer's `GaLoreArguments` (integrations/hf.py) and the
torchtitan groups (integrations/torchtitan.py, torchtitan_trainspec.py). tests/test_settings.py
checks that each resolves every default to the value here.

`oversample` is 0 (the library had 0, the recipe 8): the warm randomized refresh is then
subspace iteration from the previous basis without a Rayleigh-Ritz rotation, so the new basis
stays aligned with the old one, in whose coordinates the kept moments live. Measured
(benchmarks/oversample.py -> results/oversample.json: a 4-layer byte-level LLaMA, rank 32,
T = 25, 300 steps, 308 warm refreshes): the share of the exact top-rank gradient energy the
subspace captures is 99.87% on average (worst 99.13%) at 0 and 99.96% (worst 99.74%) at 8;
8 takes 2.7x the refresh time (0.215 s against 0.080 s); the mean loss of the last 20 steps is
1.654 at 0, 1.675 at 8, 1.680 with exact SVD refreshes (one seed each: no sign that 8 trains
better). Oversampling buys a tenth of a percent of captured energy at 2.7x the refresh cost.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# On a refresh, what happens to the low-rank moments; each update rule supports a subset
# (its `moment_policies`).
MOMENT_POLICIES = ("keep", "reproject", "reset")


@dataclass(frozen=True)
class GaLoreSettings:
    """GaLore's options with their defaults (the paper's pre-training recipe where it has one)."""

    rank: int = 128                 # projection rank r
    update_proj_gap: int = 200      # T: refresh the projector every T steps, from step 0
    scale: float = 0.25             # alpha: the update is scaled by it after projecting back
    proj_type: str = "std"          # std | reverse_std | left | right (from the global shape)
    target_modules: tuple[str, ...] = ("attn", "mlp")   # module-name parts of the projected weights
    refresh: str = "svd"            # svd (exact, the paper) | randomized (seeded subspace iteration)
    signs: str = "aligned"          # aligned (deterministic) | lapack (galore-torch bit for bit)
    moments: str = "keep"           # on refresh: keep (the paper) | reproject | reset
    stagger: bool = False           # spread refreshes of different matrices across the window
    oversample: int = 0             # randomized: extra random vectors (then Rayleigh-Ritz); see above
    power_iters: int = 1            # randomized: iterations per warm-started refresh
    first_power_iters: int = 4      # randomized: iterations of the cold (first) refresh
    seed: int = 0                   # randomized: seeds are (seed, step, parameter index)


DEFAULTS = GaLoreSettings()
FIELDS = tuple(f.name for f in dataclasses.fields(GaLoreSettings))
# galore-torch's group keys besides `rank` (the key that makes a group a GaLore group)
GROUP_KEYS = ("update_proj_gap", "scale", "proj_type")
# options beyond the paper; optimizer keywords, any group may override them
OPTION_KEYS = ("refresh", "signs", "moments", "stagger", "oversample", "power_iters", "first_power_iters", "seed")


def defaults_of(keys: tuple[str, ...], settings: Any = None) -> dict[str, Any]:
    """{key: default} for `keys`, from DEFAULTS (or `settings`: FAMILY)."""
    return {k: getattr(DEFAULTS if settings is None else settings, k) for k in keys}


@dataclass(frozen=True)
class FamilySettings:
    """The options of GaLore's successors at its memory, with the defaults of their reference
    packages (fira 1.0.2, apollo-torch 1.0.3): keywords of FiraAdamW and ApolloAdamW (any group
    may override them). docs/family.md says what each does and where it departs from the
    references."""

    # gamma of Fira's norm-growth limiter (APOLLO uses it too): a matrix's scaled term may grow
    # by at most this factor per step; None turns it off (apollo-torch's disable_nl)
    norm_growth_limit: float | None = 1.01
    # Fira: exact (the paper's residual G - P P^T G) | scaled (fira 1.0.2's G - scale * P P^T G)
    residual: str = "exact"
    # APOLLO: random (a seeded Gaussian projection, the paper's) | svd (GaLore's subspace)
    proj: str = "random"
    # APOLLO: channel (one factor per row or column) | tensor (one per matrix: APOLLO-Mini)
    scale_type: str = "channel"
    # APOLLO's `scale`: its update is multiplied by sqrt(scale) (apollo-torch's meaning; 128 for
    # APOLLO-Mini). GaLore's and Fira's `scale` multiplies the update itself (DEFAULTS.scale).
    apollo_scale: float = 1.0
    # random projections: hashed (generator seeded by (seed, parameter index, refresh index), drawn
    # on the CPU: the same on every device) | apollo (apollo-torch's seeds: the 1-based parameter
    # index, advanced at each refresh, drawn on the gradient's device as it does)
    proj_seeds: str = "hashed"


FAMILY = FamilySettings()
# APOLLO-Mini is ApolloAdamW with these (apollo-torch's README): rank 1, one scale per matrix,
# scale 128. Every entry point that names it (recipe, Trainer) reads them here.
APOLLO_MINI_RANK = 1
APOLLO_MINI = dict(scale_type="tensor", scale=128)
FIRA_KEYS = ("norm_growth_limit", "residual")
APOLLO_KEYS = ("norm_growth_limit", "proj", "scale_type", "proj_seeds")
# the family's options that name a choice, with the choices
FAMILY_CHOICES: dict[str, tuple[str, ...]] = {
    "residual": ("exact", "scaled"),
    "proj": ("random", "svd"),
    "scale_type": ("channel", "tensor"),
    "proj_seeds": ("hashed", "apollo"),
}


def check_family_options(group: dict[str, Any], projections: tuple[str, ...]) -> None:
    """Refuse a GaLore group's bad family option, naming the key: a choice outside its list, a
    `proj` the optimizer's rule cannot use (its `projections`), a limit below 1."""
    for key, choices in FAMILY_CHOICES.items():
        if key in group and group[key] not in choices:
            raise ValueError(f"param group {key}={group[key]!r}: expected one of {choices}")
    if group.get("proj", projections[0]) not in projections:
        raise ValueError(f"param group proj={group['proj']!r}: this optimizer projects with {tuple(projections)}")
    limit = group.get("norm_growth_limit")
    if limit is not None and not (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit >= 1.0):
        raise ValueError(f"param group norm_growth_limit={limit!r}: must be a number >= 1 (Fira's 1.01), "
                         "or None to turn the limiter off")


__all__ = ["GaLoreSettings", "DEFAULTS", "FIELDS", "GROUP_KEYS", "OPTION_KEYS", "MOMENT_POLICIES", "defaults_of",
           "FamilySettings", "FAMILY", "APOLLO_MINI", "APOLLO_MINI_RANK", "FIRA_KEYS", "APOLLO_KEYS", "FAMILY_CHOICES", "check_family_options"]
