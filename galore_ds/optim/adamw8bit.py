"""GaLoreAdamW8bit: AdamW with bitsandbytes' blockwise 8-bit moments, on the low-rank gradient.

The moments of a GaLore matrix are (m, r) or (r, n) tensors quantised in 256-value blocks
(bitsandbytes' dynamic maps), so the state is ~2 bytes per low-rank entry. The kernel runs
on CUDA and on CPU (galore-torch's AdamW8bit calls torch.cuda.synchronize and cannot).
The kernel writes its update into a zero low-rank buffer (lr and bias correction
included), which is then mapped back into the weight in one fused addmm.
"""
from __future__ import annotations

from typing import Iterable

import torch

from galore_ds.optim.base import GaLoreOptimizer, ParamItem, check_adam_hyperparameters

_BLOCKSIZE = 256  # bitsandbytes' blockwise quantisation block
_QMAPS: dict[tuple[str, bool], torch.Tensor] = {}


def _qmap(device: torch.device, signed: bool) -> torch.Tensor:
    """bitsandbytes' dynamic quantisation map (signed for m, unsigned for v), one per device."""
    key = (str(device), signed)
    if key not in _QMAPS:
        import bitsandbytes.functional as bnbf

        _QMAPS[key] = bnbf.create_dynamic_map(signed=signed).to(device)
    return _QMAPS[key]


class GaLoreAdamW8bit(GaLoreOptimizer):
    """8-bit AdamW (bitsandbytes blockwise) with GaLore projection for groups with `rank`.

    Tensors with fewer than `min_8bit_size` elements keep fp32 moments (bitsandbytes' rule).
    Groups without `rank` (embeddings, lm_head, norms) get plain 8-bit AdamW.
    """

    supported_moment_policies = ("keep", "reset")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
        **galore_options,
    ) -> None:
        check_adam_hyperparameters(lr, betas, eps)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        min_8bit_size=min_8bit_size, **galore_options)
        super().__init__(params, defaults)

    @staticmethod
    def _init_moments(state: dict, like: torch.Tensor, group: dict) -> None:
        if like.numel() >= group["min_8bit_size"]:
            blocks = -(-like.numel() // _BLOCKSIZE)
            state["state1"] = torch.zeros_like(like, dtype=torch.uint8)
            state["state2"] = torch.zeros_like(like, dtype=torch.uint8)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
        else:
            state["state1"] = torch.zeros_like(like, dtype=torch.float32)
            state["state2"] = torch.zeros_like(like, dtype=torch.float32)

    def _update(self, item: ParamItem) -> None:
        import bitsandbytes.functional as bnbf

        group, state = item.group, item.state
        grad = self._low_rank_grad(item).contiguous()
        if "state1" not in state:
            self._init_moments(state, grad, group)
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
            bnbf.optimizer_update_8bit_blockwise(
                "adam", grad, target, state["state1"], state["state2"], beta1, beta2, 0.0, 0.0,
                group["eps"], step, group["lr"], _qmap(grad.device, True), _qmap(grad.device, False),
                state["absmax1"], state["absmax2"], decay,
            )
        else:
            bnbf.optimizer_update_32bit(
                "adam", grad, target, state["state1"], beta1, group["eps"], step, group["lr"],
                state["state2"], beta2, 0.0, 0.0, decay,
            )
        if item.galore:
            self._apply_update(item, target, 1.0)
            if group["weight_decay"] > 0.0:
                item.param.add_(item.param, alpha=-group["lr"] * group["weight_decay"])

    def _reset_moments(self, state: dict) -> None:
        # Zero absmax dequantises every 8-bit entry to 0.
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in state and state[key].dtype != torch.uint8:
                state[key].zero_()
