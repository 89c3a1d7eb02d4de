"""LLaMA from the recipe: transformers' LlamaForCausalLM, built locally (never the hub).

model.activation_checkpointing recomputes each decoder layer in backward (transformers'
gradient checkpointing): what lets configs/7b.json train at micro-batch 4 on one 24 GB GPU.

Small models are built directly on CPU. Large ones (or model.meta_init=true) are built on the
meta device in the recipe dtype, so a 7B model never exists in fp32 on the host; the engine
materialises it (after sharding, for FSDP/ZeRO-3) with `materialize`. `init_weights` is the one
initialisation used by both paths, so a meta-built model materialised on CPU is bit-identical
to a CPU-built one with the same seed.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from galore_ds.train.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
META_INIT_PARAMS = 1_000_000_000  # auto meta_init from this many parameters


def llama_config(m: ModelConfig) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads or m.num_attention_heads,
        vocab_size=m.vocab_size,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.rms_norm_eps,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings,
        initializer_range=m.init_std,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
        attn_implementation="sdpa",
    )


def num_params(m: ModelConfig) -> int:
    """Analytic parameter count (no model needed)."""
    h, i, L, v = m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.vocab_size
    kv = (m.num_key_value_heads or m.num_attention_heads) * (h // m.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return L * per_layer + v * h * (1 if m.tie_word_embeddings else 2) + h


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def use_meta(m: ModelConfig) -> bool:
    return m.meta_init if m.meta_init is not None else num_params(m) >= META_INIT_PARAMS


def build_model(m: ModelConfig, seed: int = 0, meta: bool | None = None) -> nn.Module:
    """LlamaForCausalLM in m.dtype; on the meta device if `meta` (default: use_meta(m))."""
    meta = use_meta(m) if meta is None else meta
    dtype = DTYPES[m.dtype]
    cfg = llama_config(m)
    # Parameters are created directly in the target dtype (no fp32 copy), on meta if asked.
    with _default_dtype(dtype), (torch.device("meta") if meta else contextlib.nullcontext()):
        model = LlamaForCausalLM(cfg)
    if not meta:
        init_weights(model, m.init_std, seed)
    if m.activation_checkpointing:
        # Non-reentrant: parameters' post-accumulate-grad hooks (the per-layer engine) fire once
        # per backward, and recomputation gives bit-identical activations.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.23's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def materialize(model: nn.Module, device: torch.device | str, std: float, seed: int = 0) -> nn.Module:
    """Allocate a meta-device model's storage on `device` and initialise it (init_weights)."""
    model.to_empty(device=device)
    init_weights(model, std, seed)
    return model


@torch.no_grad()
def init_weights(model: nn.Module, std: float, seed: int = 0) -> None:
    """Deterministic init: N(0, std) for linear/embedding weights, ones for norms, and the
    rotary buffers recomputed (they are not parameters, so to_empty leaves garbage there).
    Draws come from a CPU generator in fp32 and are cast, so the result does not depend on
    the device or on the meta path."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            w = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            p.copy_(w.to(p.dtype))
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_type"):
            fn = module.compute_default_rope_parameters if module.rope_type == "default" else None
            if fn is None:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
                fn = ROPE_INIT_FUNCTIONS[module.rope_type]
            inv_freq, module.attention_scaling = fn(module.config)
            dev = module.inv_freq.device
            module.inv_freq = inv_freq.to(dev)
            module.original_inv_freq = inv_freq.clone().to(dev)


__all__ = ["build_model", "materialize", "init_weights", "llama_config", "num_params", "use_meta", "DTYPES"]
