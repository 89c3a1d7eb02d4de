"""GaLoreOptimizer: the one step skeleton of every GaLore optimizer, on every layout.

A step reads how each parameter is laid out (layouts/base.py: plain tensor, DTensor from its
placements, a DeepSpeed ZeRO piece) and runs the same phases everywhere:

  1. collect   one Entry per parameter with a gradient: its layout, state and local views
  2. refresh   the due projectors (optim/refresh.py: local, owner, or distributed subspace
               iteration; the same basis the single-process optimizer computes)
  3. project   R = the gradient in the rule's coordinates (GaLore: projected; other
               parameters: the full gradient), completed where the layout leaves partial
               sums (one packed all-reduce per process group) and averaged over a
               `reduce_group` (per-rank contributions)
  4. norm      the global L2 norm of what the optimizer consumes (every R), before clipping:
               one scalar all-reduce per process group of sharded parameters. It is
               `grad_norm`; clipping (`max_grad_norm`) scales every R by
               min(1, max / (norm + 1e-6)) (torch's formula); a NaN/Inf norm skips the step
               on every rank: weights, moments, projectors and step counts stay as they were
               (refreshes of this step undone), `skipped_steps` += 1, `overflow` is True
  5. update    the rule (AdamW, 8-bit AdamW, Adafactor: galore_ds/core) on every Item, then
               partial-row copies are written back and step counts advance

Clipping by the norm of what the optimizer consumes is the one definition every engine can
compute: the per-layer mode never forms an accumulated full gradient, nor does data
parallelism that averages only projected gradients. Projection is linear and the refresh
is scale-invariant, so clipping R by c equals clipping G by c before projecting.

Per-parameter state is plain tensors and numbers (torch.load(weights_only=True) works):
  step              optimizer steps taken by this parameter (galore-torch's "step")
  proj              projector tensor (core/projector.py for the layout)
  proj_right        True: right projection, False: left (a bool: torch's load_state_dict
                    rebuilds any iterable state value, strings included)
  refresh_offset    step offset of this matrix's refresh within the update_proj_gap window
  + the rule's moments, shaped like the block of R this rank holds.
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from galore_ds.core import projector as pj
from galore_ds.core.groups import (
    GALORE_GROUP_DEFAULTS,
    GALORE_KEYS,
    GALORE_OPTION_DEFAULTS,
    OPTIMIZER_WIDE_KEYS,
    check_galore_group,
    global_shape,
    refresh_due,
    refresh_offset,
)
from galore_ds.core.scratch import Scratch
from galore_ds.core.rule import projection_of
from galore_ds.core.settings import check_family_options
from galore_ds.core.update import Item, Split, clip_coefficient
from galore_ds.layouts.base import Layout, local_tensor, plain_layout
from galore_ds.layouts.comm import COMM, all_reduce_packed, assign_owners, group_rank_size, max_over_groups, svd_cost
from galore_ds.layouts.dtensor import dtensor_layout, is_dtensor
from galore_ds.optim.checkpoint.places import as_values, dtensor_block
from galore_ds.optim.entry import Entry
from galore_ds.optim.refresh import refresh as refresh_entries
from galore_ds.layouts.zero import ZeroBinding

CLIP_TIMINGS = ("exact", "delayed")
_IGNORE_STEPS = [0]


@contextlib.contextmanager
def steps_ignored() -> Iterator[None]:
    """GaLore optimizers' step() does nothing inside (a framework configuring itself, such as
    DeepSpeed's wrappers taking one step on zero gradients to create their states)."""
    _IGNORE_STEPS[0] += 1
    try:
        yield
    finally:
        _IGNORE_STEPS[0] -= 1


def split_by_shape(params: list, rank: int, galore: dict[str, Any]) -> list[dict]:
    """A flat parameter list with a GaLore `rank` (DeepSpeed's JSON path hands the optimizer
    model.parameters()): every 2-D parameter with min(shape) >= rank is projected; other
    matrices and the vectors keep the full-rank rule, vectors without weight decay. Select by
    module name with galore_ds.param_groups when the names are at hand."""
    mats, rest_2d, rest_1d = [], [], []
    for p in params:
        shape = global_shape(p)
        if len(shape) == 2 and min(shape) >= rank:
            mats.append(p)
        elif len(shape) >= 2:
            rest_2d.append(p)
        else:
            rest_1d.append(p)
    groups = [dict(params=mats, rank=rank, **galore)] if mats else []
    if rest_2d:
        groups.append(dict(params=rest_2d))
    if rest_1d:
        groups.append(dict(params=rest_1d, weight_decay=0.0))
    return groups


class GaLoreOptimizer(Optimizer):
    """Base class of GaLoreAdamW, GaLoreAdamW8bit and GaLoreAdafactor (see module docstring).

    Subclasses set `self.rule` (galore_ds/core) before calling this constructor.

    Args beyond torch's:
        update_proj_gap, scale, proj_type: defaults for the GaLore groups (those that set
            `rank`) that do not set them, here and in add_param_group (torch's rule);
            unset, GALORE_GROUP_DEFAULTS (core/groups.py). Kept in `galore_defaults`.
        rank: with a flat parameter list, selects the matrices by shape (`split_by_shape`);
            with groups, each GaLore group sets its own (it is what makes it one).
        max_grad_norm: clip by the global norm of what the optimizer consumes (None: off).
        clip_timing: "exact" (this step's norm) or "delayed" (the previous step's: what the
            per-layer mode does to keep updates inside backward; offered here so a recipe runs
            the same algorithm on every engine).
        reduce_group: gradients arrive as this rank's own contribution, not averaged across
            this process group (replicated data parallelism without gradient sync, HSDP
            replicas without their all-reduce); the optimizer averages the projected
            gradients (n/r less traffic than averaging G) and the other parameters' gradients.
    """

    rule: Any = None

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, rank: int | None = None,
                 update_proj_gap: int | None = None, scale: float | None = None,
                 proj_type: str | None = None, max_grad_norm: float | None = None,
                 clip_timing: str = "exact", reduce_group: Any = None) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: must be > 0 or None")
        if clip_timing not in CLIP_TIMINGS:
            raise ValueError(f"clip_timing={clip_timing!r}: expected one of {CLIP_TIMINGS}")
        if "target_modules" in defaults:
            raise ValueError("target_modules selects matrices by module name, which a parameter list does "
                             "not carry: pass galore_ds.param_groups(model, target_modules=...) as params "
                             "(DeepSpeed JSON: galore_ds.integrations.deepspeed.initialize)")
        # torch's rule, for the GaLore keys too: the constructor's values are the defaults of
        # every GaLore group that does not set them, at construction and in add_param_group.
        # They are kept apart from torch's `defaults`, which torch writes into every group: a
        # group becomes a GaLore group by setting `rank`, so `rank` cannot be a default.
        given = {k: v for k, v in dict(update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type).items()
                 if v is not None}
        self.galore_defaults: dict[str, Any] = {**GALORE_GROUP_DEFAULTS, **given}
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [dict(g) for g in params]   # filled with defaults below: the caller's dicts stay as given
        elif rank is not None:
            params = split_by_shape(params, rank, {})
        for key, value in GALORE_OPTION_DEFAULTS.items():
            defaults.setdefault(key, value)
        self.max_grad_norm = max_grad_norm
        self.clip_timing = clip_timing
        self.next_clip_coef = 1.0             # delayed clipping: the coefficient of the last norm
        if reduce_group is not None and self.rule.needs_full_grad:
            raise ValueError(f"{type(self).__name__}(reduce_group=...): its rule reads each matrix's full gradient, "
                             "so averaging only projected gradients cannot carry it; use plain DDP (or FSDP2's own "
                             "HSDP) and no reduce_group")
        self.reduce_group = reduce_group
        # Counters a trainer can log (this process; not part of the state dict).
        # refresh_s: wall seconds spent computing and installing projectors (device-synchronized).
        self.galore_stats: dict[str, float] = {"refreshes": 0, "svd_failures": 0, "nonfinite_refresh_skipped": 0,
                                               "refresh_s": 0.0}
        self.grad_norm: float | None = None   # the last step's global norm of what it consumed
        self.clip_coef: float = 1.0
        self.skipped_steps = 0                # steps dropped for a NaN/Inf gradient
        self.overflow = False                 # the last step was dropped (DeepSpeed reads this)
        self.zero: ZeroBinding | None = None  # set by galore_ds.integrations.deepspeed
        self.replica_group: Any = None        # ZeRO-0 / DDP: whole tensors, identical on these ranks
        self.lowrank = None                   # a DDP comm hook's LowRankReduction (optim/lowrank_ddp.py)
        self._layouts: dict[int, tuple[weakref.ref, Layout]] = {}
        self._param_ids: tuple[int, ...] = ()  # the groups' parameters when the caches were filled
        self._index: dict[int, int] = {}
        self._owners: dict[int, int] | None = None  # replicated GaLore matrices -> refreshing rank
        self._scratch = Scratch()
        self._pending: list[tuple[list[Item], dict, list[Entry]]] = []
        super().__init__(params, defaults)
        self._watch_own_gradients()  # reduce_group: see check_gradients_unchanged

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group (the constructor's keywords fill what the group does not
        set), plus: a GaLore group (one that sets `rank`) takes the constructor's
        update_proj_gap / scale / proj_type where it sets none, and is checked; a group that
        sets an optimizer-wide argument (max_grad_norm, clip_timing, reduce_group) is refused,
        since one group cannot have its own global norm. A GaLore group's Fira / APOLLO
        options (core/settings.py: FamilySettings) are checked too, `proj` against the rule's
        projector sources."""
        wide = [k for k in OPTIMIZER_WIDE_KEYS if k in param_group]
        if wide:
            raise ValueError(f"param group sets {wide[0]}={param_group[wide[0]]!r}: {wide[0]} is optimizer-wide, "
                             f"not a group key; pass it to the constructor: {type(self).__name__}(params, "
                             f"{wide[0]}=...)")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            check_galore_group(group, self.rule.moment_policies, [global_shape(p) for p in group["params"]],
                               defaults=self.galore_defaults)
            check_family_options(group, tuple(self.rule.projections))

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, in a form every checkpoint path carries whole:
        - every param group holds `next_clip_coef`, the coefficient delayed clipping carries
          into the next step (torch's get/set_optimizer_state_dict keep only `state` and
          `param_groups`); `galore` holds it as well (what older checkpoints carry);
        - projectors are contiguous: a full state dict broadcast from rank 0 receives a
          tensor's storage into row-major buffers (rank 0's column-major projectors came back
          transposed on every other rank); load_state_dict puts them back in their layout;
        - under a process group with DTensor parameters (FSDP2), each rank's block of a split
          state tensor (its rows of R's moments, its rows of a full-rank parameter's) is a
          DTensor block of the logical tensor. As plain tensors, torch's
          get_optimizer_state_dict + DCP would save them from one rank only (and a full state
          dict would take one rank's block for the whole); as DTensors every rank's block is
          saved, and DCP reshards them on load. GaLoreAdamW8bit's codes have an absmax per 256
          values of the rank's own block, so they are not blocks of one tensor: there its two
          moments are given as their fp32 values, `exp_avg` and `exp_avg_sq`, and
          load_state_dict quantizes them back, bit-identically where the loading rank's
          blocks are the saver's (a resume on the same world size), within one code step
          elsewhere. Without DTensor parameters the 8-bit codes are given as they are."""
        sd = super().state_dict()
        coef = float(self.next_clip_coef)
        sd["galore"] = {"next_clip_coef": coef}
        for group in sd["param_groups"]:
            group["next_clip_coef"] = coef
        self._split_state_as_dtensors(sd["state"])
        return sd

    def _split_state_as_dtensors(self, state: dict[int, dict[str, Any]]) -> None:
        """state_dict's per-parameter form (see state_dict): contiguous projectors; under a
        process group, DTensor blocks for DTensor parameters and 8-bit moments as fp32 values."""
        distributed = dist.is_available() and dist.is_initialized()
        index = 0   # torch's state_dict numbers parameters in group order
        for group in self.param_groups:
            for pos, p in enumerate(group["params"]):
                st = state.get(index)
                index += 1
                if not st:
                    continue
                # a new dict: torch's state_dict shares the per-parameter dicts with self.state
                st = {key: value.contiguous() if key == "proj" and torch.is_tensor(value) else value
                      for key, value in st.items()}
                if distributed and is_dtensor(p):
                    e = self.entry(p, p, self.layout_of(p), group, self.param_index(p), pos, len(group["params"]), None)
                    st = as_values(self.rule, st)
                    st = {key: dtensor_block(e, key, value) if torch.is_tensor(value) else value
                          for key, value in st.items()}
                state[index - 1] = st

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, with GaLore's checks and forms:
        - hyperparameters follow torch's rule: the checkpoint's values (lr, betas, weight
          decay, update_proj_gap, scale, ...) replace the ones the optimizer was built with;
          GaLore's shapes do not: a checkpoint whose rank or projector side differs from
          this optimizer's is refused with one line (ValueError) and nothing is installed;
        - a DTensor block saved on another layout (a per-rank state_dict() loaded on another
          world size) is refused with one line naming the paths that reshard;
        - torch's loader casts floating state to the parameter's dtype; GaLore keeps fp32
          moments for bf16 weights, so saved tensors are re-installed with their saved dtype
          (moved to the parameter's device only), projectors in their stored layout, and
          GaLoreAdamW8bit's fp32 moments (state_dict under FSDP2) quantized back;
        - `next_clip_coef` (delayed clipping) comes from the param groups (or `galore`)."""
        saved = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):  # (torch's loader refuses other counts)
            for gi, (saved_group, group) in enumerate(zip(saved_groups, self.param_groups)):
                for pid, p in zip(saved_group["params"], group["params"]):
                    self._check_loadable(gi, saved_group, group, pid, p, saved.get(pid, {}))
        coef = next((g["next_clip_coef"] for g in saved_groups if "next_clip_coef" in g),
                    state_dict.get("galore", {}).get("next_clip_coef", 1.0))
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.pop("next_clip_coef", None)   # optimizer-wide: kept on the optimizer
        self.next_clip_coef = float(coef)
        eight_bit = self.rule.quantized
        for saved_group, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                dense = {}
                for key, value in saved.get(pid, {}).items():
                    if not torch.is_tensor(value):
                        continue
                    value = local_tensor(value).to(device=local_tensor(p).device, copy=True)
                    if eight_bit and key in self.rule.state_layout:   # its moments' fp32 values
                        dense[key] = value
                        del self.state[p][key]
                    else:
                        self.state[p][key] = pj.stored_layout(value) if key == "proj" else value
                if dense:
                    shape = tuple(next(iter(dense.values())).shape)
                    self.state[p].update(self.rule.from_values(dense, group, shape, local_tensor(p).device, exact=True))

    def _check_loadable(self, gi: int, saved_group: dict, group: dict, pid: Any, p: torch.Tensor,
                        st: dict[str, Any]) -> None:
        """load_state_dict's refusals for one parameter, before anything is installed."""
        if ("rank" in saved_group or "rank" in group) and saved_group.get("rank") != group.get("rank"):
            raise ValueError(
                f"load_state_dict: param group {gi} rank: the checkpoint has {saved_group.get('rank')}, this "
                f"optimizer was built with {group.get('rank')}; GaLore's projectors and moments are shaped by "
                f"rank: build the optimizer with rank={saved_group.get('rank')} to resume this checkpoint")
        if "proj_right" in st and "rank" in group:
            built = pj.choose_side(global_shape(p), group["proj_type"])
            was = "right" if bool(st["proj_right"]) else "left"
            if was != built:
                raise ValueError(
                    f"load_state_dict: param group {gi} proj_type: the checkpoint's "
                    f"{saved_group.get('proj_type')!r} projects a {tuple(global_shape(p))} matrix on the {was}, "
                    f"this optimizer's {group['proj_type']!r} on the {built}; build the optimizer with "
                    f"proj_type={saved_group.get('proj_type')!r} to resume this checkpoint")
        for key, value in st.items():
            if is_dtensor(value) and is_dtensor(p) and value.device_mesh.mesh.tolist() != p.device_mesh.mesh.tolist():
                raise ValueError(
                    f"load_state_dict: state {key!r} of a {tuple(global_shape(p))} parameter is a block "
                    f"saved on ranks {value.device_mesh.mesh.tolist()}, this parameter is split over "
                    f"{p.device_mesh.mesh.tolist()}: a per-rank state_dict() resumes on the same world size "
                    "only; to change it save with torch's get_optimizer_state_dict + DCP (or "
                    "galore_ds.optim.checkpoint.dcp_state_dict / dcp_load)")

    # ------------------------------------------------------------------ layouts
    def layout_of(self, p: torch.Tensor) -> Layout:
        """How this rank holds parameter `p` (cached: placements do not change). The cache is
        keyed by id and checked by identity: a framework that swaps parameters in the groups
        (Accelerate after fully_shard) frees the old ones, and a new tensor may reuse an id."""
        cached = self._layouts.get(id(p))
        lay = cached[1] if cached is not None and cached[0]() is p else None
        if lay is None:
            reduce_group = self.reduce_group
            if self.lowrank is not None and id(p) in self.lowrank.galore:
                reduce_group = self.lowrank.group  # a comm hook leaves these gradients per rank
            if is_dtensor(p):
                lay = dtensor_layout(p, reduce_group)
            else:
                lay = plain_layout(p, reduce_group, self.replica_group)
            self._layouts[id(p)] = (weakref.ref(p), lay)
        return lay

    def attach_lowrank_reduction(self, reduction) -> None:
        """A DDP comm hook averages the projected gradients (optim/lowrank_ddp.py)."""
        self.lowrank = reduction
        self.forget_layouts()

    def lowrank_for_hook(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """This rank's projected gradient of GaLore matrix `p` for a comm hook to average, or
        None when its projector refreshes at this step (the refresh needs the gradient)."""
        state = self.state.get(p)
        if not state or "proj" not in state:
            return None
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        if refresh_due(state, group):
            return None
        proj = state["proj"]
        grad = grad.view(p.shape)
        if grad.dtype != proj.dtype:
            proj = proj.to(grad.dtype)
        return pj.project(grad, proj, "right" if state["proj_right"] else "left").float()

    def _watch_own_gradients(self) -> None:
        """With reduce_group, note each parameter's gradient as backward leaves it, in a
        post-accumulate-grad hook, for check_gradients_unchanged: a plain tensor by identity and
        version counter (O(1); autograd runs the hook at every micro-batch), a DTensor
        (FSDP2 runs the hook once per step, after its reduce-scatter) by the norm of its block,
        since an in-place op on a DTensor leaves both version counters as they were. Nothing
        keeps the gradient alive (a weak reference)."""
        self._grad_notes: dict[int, tuple[weakref.ref, int | None, torch.Tensor | None]] = {}
        if self.reduce_group is None:
            return
        owner = weakref.ref(self)  # the hooks must not keep the optimizer (and its group) alive

        def note(p: torch.Tensor) -> None:
            opt, g = owner(), p.grad
            if opt is not None and g is not None:
                opt._grad_notes[id(p)] = ((weakref.ref(g), None, grad_mark(local_tensor(g))) if is_dtensor(g)
                                          else (weakref.ref(g), g._version, None))

        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(note)

    def check_gradients_unchanged(self, entries: list[Entry]) -> None:
        """Refuse, on every rank, a step whose gradients were changed after the data-parallel
        machinery took them as each rank's own contribution (torch.nn.utils.clip_grad_norm_
        called on the model, most often): that call clips each rank by the norm of its own
        gradient, not of the average the optimizer steps with.
        - DDP + lowrank_comm_hook: the hook averaged only the GaLore matrices' projections and
          noted the norm of each gradient it read (optim/lowrank_ddp.py); a p.grad whose norm
          differs now was scaled (a coefficient within 1e-6 of 1 passes: its effect is below
          fp32 rounding). A call that scales nothing changes nothing, and the run is plain
          DDP's: whenever plain DDP would clip, some rank clips here.
        - reduce_group (replicated weights without gradient sync, HSDP replicas): every
          gradient is noted as backward leaves it (_watch_own_gradients); any in-place change
          of it since is refused, a clip_grad_norm_ that scaled nothing included (it writes
          the gradients all the same), so the wrong idiom fails at its first step.
        Over one rank nothing is refused (its own gradient is the average). Ranks may disagree
        (one clipped, another did not), so the verdict is agreed by 1-element all-reduces (over
        the hook's group; or the reduce group, then the parameters' shard groups) before the
        step's other collectives, whenever backward left notes for this step: the same on
        every rank."""
        red = self.lowrank
        flags, groups = [], []
        if red is not None and red.marks:
            pairs = [(e.g_local, mark) for e in entries for step, mark in [red.marks.get(id(e.key), (None, None))]
                     if step == e.state["step"]]
            if pairs and group_rank_size(red.group)[1] > 1:   # one rank: its own gradient is the average
                flags.append(marks_differ(torch.stack([grad_mark(g) for g, _ in pairs]),
                                           torch.stack([mark for _, mark in pairs])))
                groups.append(red.group)
            red.marks.clear()
        notes, self._grad_notes = self._grad_notes, {}
        watched = [(e, notes[id(e.param)]) for e in entries if id(e.param) in notes]
        if watched and group_rank_size(self.reduce_group)[1] > 1:
            device = watched[0][0].g_local.device
            replaced = any(e.param.grad is not ref() or (mark is None and e.param.grad._version != version)
                           for e, (ref, version, mark) in watched)
            flags.append(torch.tensor(replaced, device=device))
            marked = [(e.g_local, mark) for e, (_, _, mark) in watched if mark is not None]
            if marked:   # DTensor blocks, by value (one comparison for all)
                flags.append(marks_differ(torch.stack([grad_mark(g) for g, _ in marked]),
                                           torch.stack([mark for _, mark in marked])).to(device))
            groups.append(self.reduce_group)
            groups += [e.layout.group for e, _ in watched if e.layout.group is not None]
        if not flags:
            return
        flag = torch.stack([f.to(flags[0].device, torch.float32) for f in flags]).max().reshape(1)
        if max_over_groups(flag, groups, "clip_check").item() == 0:
            return
        if red is not None and red.group in groups:
            raise RuntimeError(
                "torch.nn.utils.clip_grad_norm_ (or another in-place change) scaled gradients that "
                "lowrank_comm_hook left per rank (only their projections are averaged), so ranks clipped by "
                "different norms: pass max_grad_norm=... to the optimizer instead (it clips by the global norm of "
                "what it consumes, the same on every rank)")
        raise RuntimeError(
            "torch.nn.utils.clip_grad_norm_ (or another in-place change) wrote gradients that are each rank's own "
            "contribution until this optimizer averages them over reduce_group, so each rank clipped by its own "
            "norm: pass max_grad_norm=... to the optimizer instead (it clips by the global norm of what it "
            "consumes, the same on every rank)")

    def forget_layouts(self) -> None:
        """Read every parameter's layout again at the next step (after a framework replaced or
        re-grouped the parameters)."""
        self._layouts.clear()
        self._index.clear()
        self._owners = None

    def param_index(self, p: torch.Tensor) -> int:
        """Stable index of `p` in the optimizer's parameter order (seeds, owner assignment)."""
        idx = self._index.get(id(p))
        if idx is None:
            self._index = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
            idx = self._index[id(p)]
        return idx

    def _rows_needed(self) -> bool:
        return self.rule.whole_rows

    def entry(self, key: Any, p: torch.Tensor, layout: Layout, group: dict, index: int, pos: int,
              n_in_group: int, grad: torch.Tensor | None) -> Entry:
        """The Entry of one parameter (creates its step bookkeeping on first sight)."""
        galore = "rank" in group
        if galore and not layout.is_matrix:
            raise RuntimeError(
                f"{type(self).__name__}: a GaLore group holds a parameter of shape {layout.shape}: its "
                "parameters were replaced after construction. Under DeepSpeed ZeRO call "
                "galore_ds.integrations.deepspeed.register() before deepspeed.initialize")
        state = self.state[key]
        if "step" not in state:
            state["step"] = 0
            if galore:
                state["refresh_offset"] = refresh_offset(group, pos, n_in_group)
        p_local, g_local, write_back = layout.local(p, grad, galore or self._rows_needed())
        g_piece = None
        if layout.piece is not None and grad is not None:
            pc = layout.piece
            g_piece = grad[pc.offset:pc.offset + pc.numel]
        return Entry(key, p, layout, group, index, state, galore, p_local, g_local, write_back, g_piece,
                     owner=self.replicated_owner(p) if galore else None, state_layout=self.rule.state_layout)

    def replicated_owner(self, p: torch.Tensor) -> int | None:
        """The rank that refreshes GaLore matrix `p` when every rank of its group holds all of
        it (per-rank contributions or replicas; None otherwise). LPT over ALL such matrices by
        SVD cost, in parameter order, the same on every rank: a per-layer run that refreshes
        one matrix at a time then spreads the SVDs over the ranks as a batched refresh does."""
        if self._owners is None:
            by_group: dict[int, tuple[Any, list[tuple[int, tuple[int, ...]]]]] = {}
            for g in self.param_groups:
                for q in g["params"] if "rank" in g else ():
                    lay = self.layout_of(q)
                    grp = lay.reduce_group if lay.reduce_group is not None else lay.replica_group
                    if lay.group is None and grp is not None and len(lay.shape) == 2:
                        by_group.setdefault(id(grp), (grp, []))[1].append((id(q), lay.shape))
            self._owners = {}
            for grp, jobs in by_group.values():
                owners = assign_owners([svd_cost(shape) for _, shape in jobs], group_rank_size(grp)[1])
                self._owners.update({key: o for (key, _), o in zip(jobs, owners)})
        return self._owners.get(id(p))

    def _entries(self) -> list[Entry]:
        ids = tuple(id(q) for g in self.param_groups for q in g["params"])
        if ids != self._param_ids:  # parameters swapped in the groups (Accelerate, FSDP2): read them again
            self.forget_layouts()
            self._param_ids = ids
        entries = []
        for group in self.param_groups:
            params = group["params"]
            for pos, p in enumerate(params):
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                flat = self.zero.flats.get(id(p)) if self.zero is not None else None
                if flat is not None:
                    for seg in flat.segments:
                        if seg.layout is not None:
                            entries.append(self.entry(seg.key, p, seg.layout, group, seg.index, seg.pos,
                                                      seg.n_in_group, grad))
                    continue
                entries.append(self.entry(p, p, self.layout_of(p), group, self.param_index(p), pos,
                                          len(params), grad))
        return entries

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if _IGNORE_STEPS[0]:
            return loss
        if self._is_state_init_step():
            self._create_states()
            return loss
        entries = self._entries()
        self.check_gradients_unchanged(entries)  # before any collective of the step
        deferred = self.zero is not None and self.zero.per_call
        items, undo = self.prepare(entries, reuse_buffers=not deferred)
        if deferred:
            # DeepSpeed steps one group (sub-group) per call: update all at its last call
            self._pending.append((items, undo, entries))
            ids = [id(p) for g in self.param_groups for p in g["params"]]
            if not self.zero.last_call(ids):
                return loss
            items = [it for batch, _, _ in self._pending for it in batch]
            undo = {k: v for _, u, _ in self._pending for k, v in u.items()}
            entries = [e for _, _, es in self._pending for e in es]
            self._pending = []
        self.finish(entries, items, undo)
        if deferred:
            for flat in self.zero.flats.values():
                if flat.copy_back is not None:
                    flat.copy_back()
        return loss

    def _is_state_init_step(self) -> bool:
        """torch.distributed.checkpoint's _init_optim_state (get/set_optimizer_state_dict on an
        optimizer without state, as torchtitan and Accelerate call them): lr 0 everywhere and
        zero gradients, to make step() create the state. A projector computed from that zero
        gradient would be arbitrary, and counting that step would shift every refresh."""
        # (DCP sets every group's "lr" to 0: None, Adafactor's relative step, is a real step)
        if self.state or any(g.get("lr") is None or float(g["lr"]) != 0.0 for g in self.param_groups):
            return False
        nonzero = any(bool(local_tensor(p.grad).count_nonzero()) for g in self.param_groups
                      for p in g["params"] if p.grad is not None)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # a rank holding empty shards sees zeros either way: decide together
            # on the parameters' device: NCCL reduces only CUDA tensors
            device = local_tensor(self.param_groups[0]["params"][0]).device
            flag = torch.tensor([float(nonzero)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            nonzero = bool(flag.item())
        return not nonzero

    def _create_states(self) -> None:
        """Every state entry in the shape training gives it, values that change nothing: step
        0 (so the first real step still refreshes), a zero placeholder projector, zero moments
        (the rule's init_state: no update runs, so no weight moves, whatever the rule's lr).
        What DCP then loads overwrites them; a run that never loads refreshes at its first step."""
        entries = self._entries()
        stats = dict(self.galore_stats)
        for e in entries:
            if e.galore and "proj" not in e.state:
                m, n = e.layout.shape
                basis = torch.zeros(e.group["rank"], n if e.side == "right" else m, device=e.p_local.device)
                self.install_projector(e, basis)
        items = self.complete(entries, self.project(entries, reuse_buffers=False))
        # the rule's zero state, without its update: an update at "lr 0" is not a no-op for
        # every rule (Adafactor's relative step ignores lr and its weight decay moved weights)
        for item in items:
            self.rule.init_state(item)
        for e in entries:
            e.state["step"] = 0
        self.galore_stats = stats

    def prepare(self, entries: list[Entry], reuse_buffers: bool = False) -> tuple[list[Item], dict]:
        """Phases 2-3: refresh the due projectors, project and complete every gradient.
        Returns the Items and the refresh undo log (see `finish`)."""
        undo: dict[int, tuple[dict, dict]] = {}
        due = [e for e in entries if e.galore and refresh_due(e.state, e.group)]
        if due:
            self.refresh(due, undo)
        lows = self.project(entries, reuse_buffers)
        return self.complete(entries, lows), undo

    def finish(self, entries: list[Entry], items: list[Item], undo: dict) -> bool:
        """Phases 4-5 (see the module docstring). Returns False when the step was skipped.
        The per-layer wrapper (optim/layerwise.py) ends its windows with the same three calls."""
        coef = self.clip_for(self.global_norm(entries, items))
        if coef is None:
            self.skip(undo)
            return False
        self.apply(entries, items, coef)
        return True

    # The one clipping state (max_grad_norm, clip_timing, next_clip_coef, clip_coef, grad_norm,
    # skipped_steps, overflow) lives here; the per-layer wrapper reads and writes it through
    # these phases, and checkpoints carry next_clip_coef in every param group.
    def clip_for(self, norm: float) -> float | None:
        """Phase 4 on a step's global norm: record it, and return the clip coefficient to
        apply, or None for a NaN/Inf norm (the step is skipped and carries nothing forward).
        Delayed timing applies the previous finite norm's coefficient and carries this one's."""
        self.grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if self.overflow:
            return None
        coef = clip_coefficient(norm, self.max_grad_norm)
        if self.clip_timing == "delayed":
            coef, self.next_clip_coef = self.next_clip_coef, coef
        self.clip_coef = coef
        return coef

    def immediate_clip_coef(self) -> float:
        """The coefficient of an update that runs before its step's norm is known (the
        per-layer wrapper's updates inside backward: delayed clipping, or none)."""
        return self.next_clip_coef if self.max_grad_norm is not None else 1.0

    def skip(self, undo: dict) -> None:
        """A dropped step: the state of matrices refreshed in it put back, counted."""
        self.restore(undo)
        self.skipped_steps += 1

    def apply(self, entries: list[Entry], items: list[Item], coef: float) -> None:
        """Phase 5: clip, the rule's update, write back, count the step."""
        if coef != 1.0:
            for item in items:
                item.scale_(coef)
        self.update(items)
        for e in entries:
            if e.write_back is not None:
                e.write_back()
            e.state["step"] += 1

    def collective_update(self, item: Item) -> bool:
        """Whether the rule's update of `item` is a collective (Adafactor's statistics, the
        family's limiter, of a split tensor): every rank of its group must run it."""
        return self.rule.sums_over_matrix and (item.split.dim is not None or item.split.param_group is not None)

    def update(self, items: list[Item]) -> None:
        """The rule on every item; a rank's empty blocks run only what the rule shares with
        other ranks (Adafactor's statistics)."""
        self.rule.update(items, reduce=lambda requests: all_reduce_packed(requests, name="rule_stats"))

    # ------------------------------------------------------------------ refresh
    def refresh(self, entries: list[Entry], undo: dict) -> None:
        def install(e: Entry, basis: torch.Tensor | None) -> None:
            if id(e.state) not in undo:
                reset = e.group["moments"] == "reset"  # the only policy that edits in place
                undo[id(e.state)] = (e.state, {k: v.clone() if reset and torch.is_tensor(v) else v
                                                for k, v in e.state.items()})
            self.install_projector(e, basis)

        started = time.perf_counter()
        # a random projector (APOLLO) is drawn from seeds every rank knows: each installs its
        # own copy, nothing is gathered or shared
        drawn = [e for e in entries if projection_of(self.rule, e.group) == "random"]
        for e in drawn:
            install(e, self.compute_basis(e, e.g_local if e.g_local is not None else e.p_local))
        refresh_entries([e for e in entries if projection_of(self.rule, e.group) != "random"],
                        self.compute_basis, install, self.prev_basis, self.program_for)
        if entries and entries[0].p_local.is_cuda:
            torch.cuda.synchronize(entries[0].p_local.device)  # the time of the work, not of its launch
        self.galore_stats["refresh_s"] += time.perf_counter() - started

    def prev_basis(self, e: Entry) -> torch.Tensor | None:
        return pj.proj_to_basis(e.state["proj"], e.side).float() if "proj" in e.state else None

    def program_for(self, e: Entry):
        """The randomized-refresh program of one matrix (projector.randomized_program)."""
        g, m, n = e.group, *e.layout.shape
        return pj.randomized_program(
            n if e.side == "right" else m, g["rank"], self.prev_basis(e), oversample=g["oversample"],
            iters=g["power_iters"], first_iters=g["first_power_iters"],
            generator=pj.refresh_generator(g["seed"], e.state["step"], e.index), device=e.p_local.device)

    def compute_basis(self, e: Entry, grad: torch.Tensor) -> torch.Tensor | None:
        """New basis rows for one matrix from its whole gradient, or None when the gradient is
        non-finite or the SVD fails in fp32 and fp64 (the previous projector is kept and the
        event counted: never crash, never corrupt). A random projector (the group's `proj`,
        APOLLO's default) needs no gradient: it is drawn from (seeds, parameter index, refresh
        index), so every rank, and a resumed run on any world size, draws the same one."""
        g = e.group
        if projection_of(self.rule, g) == "random":
            m, n = e.layout.shape
            refresh = pj.refresh_index(e.state["step"], e.state["refresh_offset"], g["update_proj_gap"])
            seed = pj.projection_seed(g["proj_seeds"], g["seed"], e.index, refresh)
            return pj.gaussian_basis(n if e.side == "right" else m, g["rank"], e.side, seed, grad.device,
                                     on_device=g["proj_seeds"] == "apollo")
        if not bool(torch.isfinite(grad).all()):
            self.galore_stats["nonfinite_refresh_skipped"] += 1
            return None
        try:
            return pj.compute_basis(
                grad, e.side, g["rank"], g["refresh"], self.prev_basis(e), signs=g["signs"],
                oversample=g["oversample"], iters=g["power_iters"], first_iters=g["first_power_iters"],
                generator=pj.refresh_generator(g["seed"], e.state["step"], e.index))
        except RuntimeError:
            self.galore_stats["svd_failures"] += 1
            return None

    def install_projector(self, e: Entry, basis: torch.Tensor | None) -> None:
        """Install a new basis (None: keep the old one) and apply the moment policy."""
        state, group, side = e.state, e.group, e.side
        if basis is None:
            if "proj" in state:
                return
            # First refresh failed: any fixed orthonormal basis keeps training well-defined
            # until the next refresh replaces it.
            m, n = e.layout.shape
            gen = pj.refresh_generator(group["seed"], state["step"], e.index)
            basis = pj.random_basis(n if side == "right" else m, group["rank"], gen, e.p_local.device)
        basis = basis.to(e.p_local.device, torch.float32)
        if "proj" in state:
            policy = group["moments"]
            if policy == "reproject":
                old = pj.proj_to_basis(state["proj"], side).float()
                self.rule.rotate(state, pj.rotation(old, basis), side == "right")
            elif policy == "reset":
                self.rule.reset(state)
        state["proj"] = pj.stored_layout(pj.basis_to_proj(basis.to(pj.storage_dtype(e.p_local.dtype)), side))
        state["proj_right"] = side == "right"
        self.galore_stats["refreshes"] += 1

    @staticmethod
    def restore(undo: dict) -> None:
        """Put back the state of matrices refreshed in a step that was then dropped."""
        for state, saved in undo.values():
            state.clear()
            state.update(saved)

    # ------------------------------------------------------------------ project
    @staticmethod
    def proj_block(e: Entry) -> torch.Tensor:
        """The projector's part for this rank's block: Q[:, c0:c1] (right), P[r0:r1] (left)."""
        proj = e.state["proj"]
        lay = e.layout
        if e.side == "right":
            return proj if lay.cols == (0, lay.shape[1]) else proj[:, lay.cols[0]:lay.cols[1]]
        return proj if lay.rows == (0, lay.shape[0]) else proj[lay.rows[0]:lay.rows[1]]

    def project_one(self, e: Entry, out: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's (possibly partial) projected gradient of a GaLore matrix: fp32, or fp64
        for a gradient accumulated in fp64 (LayerwiseOptimizer's accum_dtype)."""
        proj = self.proj_block(e)
        grad = e.g_local
        if grad.dtype != proj.dtype:
            proj = proj.to(grad.dtype)
        low = pj.project(grad, proj, e.side, out=out)
        return low if low.dtype in (torch.float32, torch.float64) else low.float()

    def project(self, entries: list[Entry], reuse_buffers: bool = False) -> list[torch.Tensor]:
        """The gradient each entry's rule consumes, before completion. fp32 GaLore matrices are
        projected straight into a reused buffer when `reuse_buffers` (same matmul); one a comm
        hook already projected and averaged is taken as it is."""
        if self.lowrank is not None and self.lowrank.reduced:
            # (the step it was projected for, R): an R from a step that never ran is dropped
            done = {id(e.key): r for e in entries if id(e.key) in self.lowrank.reduced
                    for step, r in [self.lowrank.reduced.pop(id(e.key))] if step == e.state["step"]}
            if done:
                rest = [e for e in entries if id(e.key) not in done]
                lows = dict(zip(map(id, rest), self.project(rest, reuse_buffers)))
                for e in entries:
                    e.averaged = id(e.key) in done
                return [done[id(e.key)] if e.averaged else lows[id(e)] for e in entries]
        views = None
        galore = [e for e in entries if e.galore]
        if reuse_buffers and galore and all(e.g_local.dtype == torch.float32 and e.state["proj"].dtype == torch.float32
                                            for e in galore):
            views = self._scratch.views("lowrank", [self.low_shape(e) for e in galore],
                                        galore[0].g_local.device, torch.float32)
        slots = iter(views) if views is not None else None
        return [self.project_one(e, next(slots) if slots is not None else None).float() if e.galore else e.g_local
                for e in entries]

    @staticmethod
    def low_shape(e: Entry) -> tuple[int, int]:
        """Shape of this rank's projected gradient (before completion)."""
        r = e.group["rank"]
        rows, cols = e.layout.rows, e.layout.cols
        return (rows[1] - rows[0], r) if e.side == "right" else (r, cols[1] - cols[0])

    def complete(self, entries: list[Entry], lows: list[torch.Tensor]) -> list[Item]:
        """Phase 3's collectives and the Items: partial sums completed over the layout's group
        (whole R, or the rows a ZeRO boundary cuts) in one packed all-reduce per group, then
        per-rank contributions averaged over reduce_group in one more."""
        sums, sum_at = [], []
        for j, (e, low) in enumerate(zip(entries, lows)):
            lay = e.layout
            if lay.group is None:
                continue
            if e.galore and not lay.contracted_whole(e.side == "right") and not (e.side == "right" and lay.split_rows):
                sums.append((low, lay.group))               # partial sums of all of R
                sum_at.append((j, None))
            elif lay.split_rows and low.dim() == 2 and (e.galore or self._rows_needed()):
                rows = self._split_rows_buffer(e, low)      # the rows a boundary cuts
                sums.append((rows, lay.group))
                sum_at.append((j, rows))
        if sums:
            done = all_reduce_packed(sums, name="partial_sums")
            for (j, rows), total in zip(sum_at, done):
                if rows is None:
                    lows[j] = total
                else:
                    self._fill_split_rows(entries[j], lows[j], total)
        avgs = [(j, (low, e.layout.reduce_group)) for j, (e, low) in enumerate(zip(entries, lows))
                if e.layout.reduce_group is not None and not e.averaged]
        if avgs:
            done = all_reduce_packed([r for _, r in avgs], op="avg", name="reduce_group")
            for (j, _), total in zip(avgs, done):
                lows[j] = total if entries[j].galore else total.to(lows[j].dtype)
        return [self._item(e, low) for e, low in zip(entries, lows)]

    @staticmethod
    def _split_rows_buffer(e: Entry, low: torch.Tensor) -> torch.Tensor:
        lay = e.layout
        buf = low.new_zeros(len(lay.split_rows), low.shape[1])
        for k, row in enumerate(lay.split_rows):
            if lay.rows[0] <= row < lay.rows[1]:
                buf[k] = low[row - lay.rows[0]]
        return buf

    @staticmethod
    def _fill_split_rows(e: Entry, low: torch.Tensor, total: torch.Tensor) -> None:
        lay = e.layout
        for k, row in enumerate(lay.split_rows):
            if lay.rows[0] <= row < lay.rows[1]:
                low[row - lay.rows[0]] = total[k]

    def _item(self, e: Entry, low: torch.Tensor) -> Item:
        lay = e.layout
        split = self._galore_split(e) if e.galore else self._full_split(e, low)
        split.grad_shape = self._rule_grad_shape(e)
        full = {}
        if e.galore and self.rule.needs_full_grad:
            # the gradient block matching p_local (Fira, APOLLO): blocks disjoint across the
            # layout's norm group; a ZeRO piece padded to whole rows says which part it holds
            full = dict(full_grad=e.g_local, full_group=lay.norm_group, held=self._held(e))
        return Item(e.p_local, low, e.state, e.group, e.galore,
                    proj=self.proj_block(e) if e.galore else None,
                    right=e.side == "right" if e.galore else True, split=split,
                    param_sq=lambda lay=lay, p=e.param: lay.own_sq(p), param_numel=lay.numel, **full)

    @staticmethod
    def _held(e: Entry) -> tuple[int, int] | None:
        """A ZeRO piece that Layout.local padded to whole rows: the flat range of the padded
        block that this rank holds (None: it holds the whole block)."""
        lay, pc = e.layout, e.layout.piece
        if pc is None:
            return None
        start = pc.start - lay.rows[0] * lay.shape[1]
        whole = (lay.rows[1] - lay.rows[0]) * lay.shape[1]
        return None if (start, pc.numel) == (0, whole) else (start, start + pc.numel)

    @staticmethod
    def _galore_split(e: Entry) -> Split:
        """How this rank's R relates to the whole R (norms, Adafactor's statistics)."""
        lay = e.layout
        if lay.group is None:  # whole here (one process; a ZeRO matrix one rank holds)
            return Split(group=lay.sum_group)
        right = e.side == "right"
        if right and lay.split_dim == 0:       # rows of R (rows a boundary cuts completed above)
            return Split(dim=0, owned=lay.owned_rows(), group=lay.group, param_group=lay.group)
        if not right and lay.split_dim == 1:   # columns of R
            return Split(dim=1, group=lay.group, param_group=lay.group)
        # all of R, identical on every rank of the group; the parameter itself is split
        return Split(param_group=lay.group)

    def _full_split(self, e: Entry, low: torch.Tensor) -> Split:
        lay = e.layout
        if lay.group is None:
            return Split(group=lay.sum_group)
        owned = lay.owned_rows() if low.dim() == 2 else slice(None)
        return Split(dim=lay.split_dim, owned=owned, group=lay.group, param_group=lay.group)

    @staticmethod
    def _rule_grad_shape(e: Entry) -> tuple[int, ...]:
        m = e.layout.shape
        if e.galore:
            r = e.group["rank"]
            return (m[0], r) if e.side == "right" else (r, m[1])
        return tuple(m)

    # ------------------------------------------------------------------ norm
    def global_norm(self, entries: list[Entry], items: list[Item]) -> float:
        """L2 norm of every consumed gradient over all ranks: blocks split across a group are
        summed over it (one scalar all-reduce per group), whole ones counted here."""
        layouts = [e.layout for e in entries]
        if self.zero is not None:
            layouts += [seg.layout for ft in self.zero.flats.values() for seg in ft.segments if seg.layout is not None]
        groups = norm_groups(layouts)
        views: dict[int, list[torch.Tensor]] = {0: []}
        for item in items:
            views.setdefault(norm_key(item), []).append(self.owned(item))
        return norm_from_squares({key: _sum_of_squares(ts) for key, ts in views.items()}, groups)

    @staticmethod
    def owned(item: Item) -> torch.Tensor:
        """The part of an item's gradient this rank counts in whole-tensor sums: what the rule
        consumes, the full gradient block when it reads one (its blocks are disjoint; padding
        is zero), else R or the full-rank gradient."""
        if item.full_grad is not None:
            return item.full_grad
        g, sp = item.grad, item.split
        if sp.dim == 0 and g.dim() == 2:
            return g[sp.owned]
        if sp.dim == 1:
            return g[:, sp.owned]
        return g

    @classmethod
    def owned_sq(cls, item: Item) -> torch.Tensor:
        """Squared norm of the part of an item's gradient this rank counts."""
        return _sum_of_squares([cls.owned(item)])


def grad_mark(grad: torch.Tensor) -> torch.Tensor:
    """What is noted of a gradient when the data-parallel machinery takes it, and recomputed
    the same way at the step (GaLoreOptimizer.check_gradients_unchanged): its L2 norm (fp32, on
    its device; a scaled gradient has a scaled norm)."""
    return torch.linalg.vector_norm(grad, dtype=torch.float32)


def marks_differ(now: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """Whether any gradient's norm differs from the one noted by more than 1e-6 relative (a
    coefficient that close to 1 changes nothing above fp32 rounding). A NaN/Inf norm, then or
    now, does not count: the optimizer skips that step on every rank (its norm is non-finite),
    so nothing is applied that a clip could have made differ."""
    now = now.to(then.device)
    return (torch.isfinite(now) & torch.isfinite(then) & ((now - then).abs() > 1e-6 * then)).any()


def norm_groups(layouts: Iterable[Layout]) -> dict[int, Any]:
    """Every process group some layout's norm sums over, by id: each joins every step's norm
    reduction, even on a rank that holds nothing of it this step."""
    groups: dict[int, Any] = {}
    for lay in layouts:
        if lay.norm_group is not None:
            groups.setdefault(id(lay.norm_group), lay.norm_group)
    return groups


def norm_key(item: Item) -> int:
    """Where an item's squared norm is summed (GaLoreOptimizer.owned): 0 (whole here) or the
    id of the group its counted blocks are disjoint across."""
    group = item.full_group if item.full_grad is not None else item.split.group
    return 0 if group is None else id(group)


def norm_from_squares(sq: dict[int, torch.Tensor], groups: dict[int, Any]) -> float:
    """The global L2 norm from squared sums by `norm_key`: the local one (key 0) plus each
    group's, summed over its ranks in ONE packed all-reduce (one scalar per group)."""
    total = sq.get(0, torch.zeros((), dtype=torch.float32)).reshape(())
    if groups:
        zero = torch.zeros((), dtype=torch.float32)
        sums = all_reduce_packed([(sq.get(key, zero).reshape(1).float(), g) for key, g in groups.items()],
                                 name="grad_norm")
        total = total + sum(s.reshape(()) for s in sums)
    return math.sqrt(float(total))


def _sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum of ||t||^2 in fp32 on the CPU, one foreach kernel (non-finite iff any t holds NaN/Inf)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum().cpu()


__all__ = ["GaLoreOptimizer", "split_by_shape"]
