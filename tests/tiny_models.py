"""Small models and batches shared by the tests (built from a config: no hub)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

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


TITAN_VOCAB, TITAN_DIM = 64, 32


class TitanBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.Module()
        for name in ("wq", "wk", "wv", "wo"):
            setattr(self.attention, name, nn.Linear(TITAN_DIM, TITAN_DIM, bias=False))
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(TITAN_DIM, 48, bias=False)
        self.feed_forward.w3 = nn.Linear(TITAN_DIM, 48, bias=False)
        self.feed_forward.w2 = nn.Linear(48, TITAN_DIM, bias=False)
        self.attention_norm = nn.RMSNorm(TITAN_DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attention
        x = self.attention_norm(h)
        h = h + a.wo(torch.tanh(a.wq(x)) * a.wk(x) + a.wv(x))
        f = self.feed_forward
        return h + f.w2(nn.functional.silu(f.w1(h)) * f.w3(h))


class TitanLike(nn.Module):
    """torchtitan's LLaMA module names: tok_embeddings, layers.N.attention.wq, feed_forward.w1, norm, output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings = nn.Embedding(TITAN_VOCAB, TITAN_DIM)
        self.layers = nn.ModuleDict({str(i): TitanBlock() for i in range(2)})
        self.norm = nn.RMSNorm(TITAN_DIM)
        self.output = nn.Linear(TITAN_DIM, TITAN_VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


def titan_batch(step: int) -> torch.Tensor:
    """The global batch of TitanLike's step `step`: 4 sequences of 12 tokens."""
    return torch.randint(0, TITAN_VOCAB, (4, 12), generator=torch.Generator().manual_seed(step))


def titan_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, TITAN_VOCAB), x[:, 1:].reshape(-1))
