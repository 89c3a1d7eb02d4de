"""The 8-bit AdamW rule: bitsandbytes' blockwise 8-bit moments on the low-rank gradient.

The moments of a GaLore matrix are (m, r) or (r, n) tensors quantised in 256-value blocks
(bitsandbytes' dynamic maps), so the state is ~2 bytes per low-rank entry. Blocks are formed
over the moments a rank holds, so a sharded run is equal to one process only to within the
quantisation (its stated tolerance), not bit for bit. The kernel runs on CUDA and on CPU
(galore-torch's AdamW8bit calls torch.cuda.synchronize and cannot). It writes its update
into a zero low-rank buffer (lr and bias correction included), which is then mapped back
into the weight in one fused addmm. Tensors with fewer than `min_8bit_size` elements keep
fp32 moments (bitsandbytes' rule).
"""
from __future__ import annotations

import torch

from galore_ds.core.rule import adam_state_shapes
from galore_ds.core.update import Item, apply_update, decay_weight

BLOCKSIZE = 256  # bitsandbytes' blockwise quantisation block
# Elements per call of the 8-bit kernel. Blocks quantise independently, so cutting a tensor at
# block boundaries gives the same bits; it bounds what bitsandbytes' unfused CPU kernel
# dequantises at once (about 6.5 fp32 copies: 3.4 GB for a 7B embedding in one call).
UPDATE_CHUNK = 2**22
MOMENT_POLICIES = ("keep", "reset")
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


class AdamW8bitRule:
    moment_policies = MOMENT_POLICIES
    whole_rows = False
    quantized = True                                  # state1/state2 codes + absmax1/absmax2
    state_shapes = staticmethod(adam_state_shapes)    # their fp32 values, as checkpoints carry them

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
