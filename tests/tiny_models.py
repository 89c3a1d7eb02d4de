"""Small models and batches shared by the tests (built from a config: no hub)."""
from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message=".*kernels.*")


def tiny_llama(hidden: int = 64, inter: int = 96, layers: int = 2, vocab: int = 96, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def batch(step: int, vocab: int = 96, bsz: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (bsz, seq), generator=torch.Generator().manual_seed(1000 + step))


def train_step(model, opt, step: int, vocab: int = 96) -> float:
    x = batch(step, vocab)
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    return float(loss.detach())


def max_rel_diff(a, b) -> float:
    """Largest per-tensor relative difference between two models' parameters."""
    return max(float((pa - pb).norm() / pa.norm().clamp_min(1e-30))
               for pa, pb in zip(a.parameters(), b.parameters()))
