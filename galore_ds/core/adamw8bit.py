"""The 8-bit AdamW rule: bitsandbytes' blockwise 8-bit moments on the low-rank gradient.

The moments of a GaLore matrix are (m, r) or (r, n) tensors quantised in 256-value blocks
(bitsandbytes' dynamic maps), so the state is ~2 bytes per low-rank entry. Blocks are formed
over the moments a rank holds, so a sharded run is equal to one process only to within the
quantisation (its stated tolerance), not bit for bit. The kernel runs on CUDA and on CPU
(galore-torch's AdamW8bit calls torch.cuda.synchronize and cannot). It writes its update
into a zero low-rank buffer (lr and bias correction included), which is then mapped back
into the weight in one fused addmm. Tensors with fewer than `min_8bit_size` elements keep
fp32 moments (bitsandbytes' rule).

The rule is `quantized` (core/rule.py, QuantizedRule): checkpoints that reshard carry its
moments as their fp32 values (`to_values`) and quantize them back in the loading rank's own
blocks (`from_values`), bit-exactly where those blocks are the saver's (`exact=True`).
"""
from __future__ import annotations

import torch

from galore_ds.core.rule import ADAM_STATE_LAYOUT, adam_state_shapes
from galore_ds.core.update import Item, apply_update, decay_weight

BLOCKSIZE = 256  # bitsandbytes' blockwise quantisation block
# Elements per call of the 8-bit kernel. Blocks quantise independently, so cutting a tensor at
# block boundaries gives the same bits; it bounds what bitsandbytes' unfused CPU kernel
# dequantises at once (about 6.5 fp32 copies: 3.4 GB for a 7B embedding in one call).
UPDATE_CHUNK = 2**22
MOMENT_POLICIES = ("keep", "reset")
#: each Adam moment's 8-bit form: (codes key, absmax key, signed map); below min_8bit_size the
#: codes key holds fp32 values and there is no absmax
MOMENTS = {"exp_avg": ("state1", "absmax1", True), "exp_avg_sq": ("state2", "absmax2", False)}
_QMAPS: dict[tuple[str, bool], torch.Tensor] = {}


def bnb_functional():
    """bitsandbytes.functional, or one line naming the extra that installs it."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise ImportError("GaLoreAdamW8bit needs bitsandbytes: pip install 'galore_ds[8bit]'") from None
    return bnbf


def qmap(device: torch.device, signed: bool) -> torch.Tensor:
    """bitsandbytes' dynamic quantisation map (signed for m, unsigned for v), one per device."""
    key = (str(device), signed)
    if key not in _QMAPS:
        _QMAPS[key] = bnb_functional().create_dynamic_map(signed=signed).to(device)
    return _QMAPS[key]


def init_moments(state: dict, like: torch.Tensor, group: dict) -> None:
    """Zero moments in the form this tensor takes: 8-bit codes + absmax per block, or fp32
    below min_8bit_size."""
    if like.numel() >= group["min_8bit_size"]:
        blocks = -(-like.numel() // BLOCKSIZE)
        state["state1"] = torch.zeros_like(like, dtype=torch.uint8)
        state["state2"] = torch.zeros_like(like, dtype=torch.uint8)
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
    else:
        state["state1"] = torch.zeros_like(like, dtype=torch.float32)
        state["state2"] = torch.zeros_like(like, dtype=torch.float32)


# --------------------------------------------------------------------- 8-bit <-> fp32 values
def dequantize(codes: torch.Tensor, absmax: torch.Tensor | None, signed: bool) -> torch.Tensor:
    """The fp32 values of an 8-bit moment block (fp32 blocks come back as they are)."""
    bnbf = bnb_functional()
    if codes.dtype != torch.uint8:
        return codes.float()
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    return bnbf.dequantize_blockwise(codes, absmax=absmax, code=qmap(codes.device, signed), blocksize=BLOCKSIZE)


def quantize(values: dict[str, torch.Tensor], group: dict, shape: tuple[int, ...],
             device: torch.device) -> dict[str, torch.Tensor]:
    """The 8-bit state of a dense block of the Adam moments: quantized in this rank's blocks,
    or fp32 below min_8bit_size (the rule's own form, init_moments)."""
    bnbf = bnb_functional()
    out: dict[str, torch.Tensor] = {}
    init_moments(out, torch.empty(shape, device=device), group)
    for key, (sk, ak, signed) in MOMENTS.items():
        x = values[key].float().contiguous().reshape(shape).to(device)
        if out[sk].dtype != torch.uint8:
            out[sk].copy_(x)
        elif x.numel():
            out[sk], qs = bnbf.quantize_blockwise(x, code=qmap(device, signed), blocksize=BLOCKSIZE)
            out[ak] = qs.absmax
    return out


def _nearest_code(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Index of the entry of the sorted map `q` nearest to each value of `v` (uint8)."""
    idx = torch.searchsorted(q, v.contiguous()).clamp_(1, q.numel() - 1)
    lo, hi = q[idx - 1], q[idx]
    return torch.where(v - lo <= hi - v, idx - 1, idx).to(torch.uint8)


def _exact_codes(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """8-bit codes and per-block absmax that dequantize to exactly `values`, or None.

    Values an 8-bit state of this rank's block boundaries dequantized to have, per block of
    256, absmax = |peak| / |q[peak code]|: 1.0 when the peak is positive (or any value of the
    unsigned map), the signed map's most negative entry when it is negative (the map has +1
    but no -1). Each candidate (and its fp32 neighbours) is checked through bitsandbytes'
    own dequantization: only a bit-exact match is used, and an equal dequantization is the
    same state for every later update (the kernel reads the moments only dequantized)."""
    q = qmap(values.device, signed)
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // BLOCKSIZE)
    if n == 0:
        return torch.zeros(values.shape, dtype=torch.uint8, device=values.device), flat.new_zeros(0)
    padded = flat.new_zeros(blocks * BLOCKSIZE)
    padded[:n] = flat
    rows = padded.view(blocks, BLOCKSIZE)
    peak = rows.abs().amax(dim=1)
    candidates = [peak]
    if signed:
        base = peak / q[0].abs()
        inf, zero = torch.full_like(base, float("inf")), torch.zeros_like(base)
        up, down = torch.nextafter(base, inf), torch.nextafter(base, zero)
        candidates += [base, up, down, torch.nextafter(up, inf), torch.nextafter(down, zero)]
    codes = torch.zeros(blocks, BLOCKSIZE, dtype=torch.uint8, device=values.device)
    absmax = torch.zeros(blocks, dtype=torch.float32, device=values.device)
    found = torch.zeros(blocks, dtype=torch.bool, device=values.device)
    for a in candidates:
        scaled = torch.where(a[:, None] > 0, rows / a[:, None].clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        c = _nearest_code(q, scaled)
        back = dequantize(c.reshape(-1)[:n].reshape(values.shape), a, signed).reshape(-1)
        back_rows = flat.new_zeros(blocks * BLOCKSIZE)
        back_rows[:n] = back
        ok = (back_rows.view(blocks, BLOCKSIZE) == rows).all(dim=1) & ~found
        codes[ok], absmax[ok] = c[ok], a[ok]
        found |= ok
        if bool(found.all()):
            return codes.reshape(-1)[:n].reshape(values.shape), absmax
    return None


class AdamW8bitRule:
    moment_policies = MOMENT_POLICIES
    whole_rows = False
    quantized = True
    needs_full_grad = False
    projections = ("svd",)
    state_layout = ADAM_STATE_LAYOUT                  # (of those values)
    sums_over_matrix = False
    state_shapes = staticmethod(adam_state_shapes)    # the moments' fp32 values, as checkpoints carry them
    code_keys = tuple(sk for sk, _, _ in MOMENTS.values())    # state1, state2
    scale_keys = tuple(ak for _, ak, _ in MOMENTS.values())   # absmax1, absmax2

    @staticmethod
    def zero_state(shape: tuple[int, ...], group: dict, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Zero moments in the form the rule keeps for a block of `shape` (see init_moments)."""
        state: dict[str, torch.Tensor] = {}
        init_moments(state, torch.empty(shape, device=device), group)
        return state

    @staticmethod
    def to_values(state: dict) -> dict[str, torch.Tensor]:
        """The fp32 values of the two moments (`exp_avg`, `exp_avg_sq`) from the 8-bit
        codes with their absmax (or the fp32 blocks below min_8bit_size) in `state`."""
        return {key: dequantize(state[sk], state.get(ak), signed) for key, (sk, ak, signed) in MOMENTS.items()}

    @staticmethod
    def from_values(values: dict[str, torch.Tensor], group: dict, shape: tuple[int, ...],
                    device: torch.device, exact: bool = False) -> dict[str, torch.Tensor]:
        """The rule's state for a block of `shape` holding the moments' fp32 `values`:
        quantized in this block's own 256-value blocks (within one code step of the values),
        or fp32 below min_8bit_size. With `exact`, a moment whose values are what 8-bit blocks
        with these boundaries dequantize to (the saver's block is this one: a resume on the
        same layout) gets codes and absmax that dequantize to exactly those values; the signed
        map has +1 but no -1, so quantizing such values again would not give them back."""
        out = quantize(values, group, shape, device)
        if not exact:
            return out
        for key, (sk, ak, signed) in MOMENTS.items():
            if out[sk].dtype == torch.uint8 and out[sk].numel():
                codes = _exact_codes(values[key].float().reshape(shape).to(device), signed)
                if codes is not None:
                    out[sk], out[ak] = codes
        return out

    def update(self, items: list[Item], reduce=None) -> None:
        for item in items:
            self._update(item)

    @staticmethod
    def _update(item: Item) -> None:
        bnbf = bnb_functional()
        group, state = item.group, item.state
        grad = item.grad.contiguous()
        AdamW8bitRule.init_state(item)
        if grad.numel() == 0:  # a rank holding no part of this tensor
            return
        beta1, beta2 = group["betas"]
        step = state["step"] + 1
        # GaLore: the kernel computes -lr * Adam direction into a zero low-rank buffer, with
        # decay off (decay is applied to the full weight below, galore-torch's order).
        target = torch.zeros_like(grad) if item.galore else item.param
        decay = 0.0 if item.galore else group["weight_decay"]
        if not item.galore and not target.is_contiguous():
            raise RuntimeError("GaLoreAdamW8bit needs contiguous parameters")
        if grad.dtype != target.dtype:
            grad = grad.to(target.dtype)
        if state["state1"].dtype == torch.uint8:
            flat = [t.view(-1) for t in (grad, target, state["state1"], state["state2"])]
            for start in range(0, grad.numel(), UPDATE_CHUNK):
                g, t, s1, s2 = (x[start:start + UPDATE_CHUNK] for x in flat)
                blocks = slice(start // BLOCKSIZE, -(-(start + g.numel()) // BLOCKSIZE))
                bnbf.optimizer_update_8bit_blockwise(
                    "adam", g, t, s1, s2, beta1, beta2, 0.0, 0.0,
                    group["eps"], step, group["lr"], qmap(grad.device, True), qmap(grad.device, False),
                    state["absmax1"][blocks], state["absmax2"][blocks], decay,
                )
        else:
            bnbf.optimizer_update_32bit(
                "adam", grad, target, state["state1"], beta1, group["eps"], step, group["lr"],
                state["state2"], beta2, 0.0, 0.0, decay,
            )
        if item.galore:
            apply_update(item, target, 1.0)
            decay_weight(item, group["lr"], group["weight_decay"])

    @staticmethod
    def init_state(item: Item) -> None:
        """Zero moments in the form the rule keeps for this gradient block (see init_moments)."""
        if "state1" not in item.state:
            init_moments(item.state, item.grad, item.group)

    @staticmethod
    def rotate(state: dict, rot: torch.Tensor, right: bool) -> None:
        raise NotImplementedError("GaLoreAdamW8bit cannot reproject 8-bit moments")

    @staticmethod
    def reset(state: dict) -> None:
        # Zero absmax dequantises every 8-bit entry to 0.
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in state and state[key].dtype != torch.uint8:
                state[key].zero_()
