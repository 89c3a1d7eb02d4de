"""Analytic memory model of one LLaMA training step (per rank), checked against measurements.

    python -m galore_ds.tools.estimate --config configs/7b.json --world-size 8
    python -m galore_ds.tools.estimate --hidden-size 4096 --intermediate-size 11008 --layers 32 \
        --heads 32 --vocab-size 32000 --seq-len 256 --micro-batch 1 --rank 1024 --dtype bfloat16

Terms (bytes; P = parameter count; "low-rank entries" of a GaLore matrix m x n at rank r is
max(m, n) * r, its projector r * min(m, n)):
  weights      P * bytes(dtype); no fp32 master copy (the optimizers update bf16 weights directly).
  gradients    stored mode: P * bytes(dtype). Per-layer mode: only the gradient of the parameter
               being updated is alive (the largest one: lm_head / embedding), plus, with
               accumulation or exact clipping, the fp32 low-rank accumulators and the full
               gradients of the non-GaLore parameters (they accumulate as usual). Delayed
               clipping (training.clip_timing) costs nothing: count it as no clipping.
  optimizer    adamw: torch.optim.AdamW, 2 moments in the parameter dtype.
               adam8bit: 2 x 1 byte + fp32 absmax per 256-block (tensors >= 4096 entries).
               galore: GaLore matrices 2 fp32 moments of the low-rank entries + projector (in
               the weight's dtype when it is 16-bit, else fp32); other parameters AdamW in their
               dtype.  galore8bit: the same in 8-bit (projector as for galore).
  activations  per layer and token: (10 h + 4 f) values saved for backward (norm inputs and
               outputs, q/k/v, rotated q/k, attention output, gate/up/silu/product), in the
               activation dtype, except that the two norm inputs are saved in fp32 (transformers'
               RMSNorm upcasts); attention probabilities are not stored (SDPA); plus the loss
               head: logits in the model dtype and 3 fp32 copies (upcast, log-softmax, its grad).
               With activation checkpointing (model.activation_checkpointing): each layer's
               input, plus one layer's activations while it is recomputed.
  transients   the largest temporary of an optimizer step (one parameter's worth).
Sharding with --world-size N: ZeRO-1 divides optimizer moments by N, ZeRO-2 also gradients,
ZeRO-3 / FSDP also weights. GaLore projectors are replicated (row-sharded right projection, see
DESIGN.md). The per-layer mode is single-rank.
Measured on CPU (benchmarks/memory.py): peak RSS minus the process baseline after imports.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from galore_ds.core.adamw8bit import UPDATE_CHUNK
from galore_ds.core.settings import APOLLO_MINI_RANK

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = ("adamw", "adam8bit", "galore", "galore8bit", "fira", "apollo", "apollo_mini")
# the low-rank rules, which have a per-layer mode; of those, the ones that read the full gradient
LOW_RANK = ("galore", "galore8bit", "fira", "apollo", "apollo_mini")
FULL_GRADIENT = ("fira", "apollo", "apollo_mini")
CONFIG_OPTIMIZER = {"adamw": "adamw", "galore_adamw": "galore", "galore_adamw8bit": "galore8bit",
                    "galore_adafactor": "galore", "fira_adamw": "fira", "apollo_adamw": "apollo",
                    "apollo_mini": "apollo_mini"}
GIB = 2**30
_BLOCK = 256
_FOREACH_BATCH = 1 << 24   # galore_ds.optim.adamw._FOREACH_BATCH_NUMEL
_MIN_8BIT = 4096


@dataclass
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    seq_len: int = 256
    micro_batch: int = 1
    num_key_value_heads: int | None = None
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    rank: int = 128

    def matrices(self) -> tuple[list[tuple[int, int]], list[int]]:
        """(GaLore matrices (out, in), other parameters' sizes)."""
        h, f = self.hidden_size, self.intermediate_size
        kv = (self.num_key_value_heads or self.num_attention_heads) * (h // self.num_attention_heads)
        per_layer = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]
        galore, other = [], []
        for _ in range(self.num_hidden_layers):
            for m, n in per_layer:
                (galore if min(m, n) >= self.rank else other).append((m, n))
            other += [h, h]  # the two RMSNorm weights
        other = [x if isinstance(x, int) else x[0] * x[1] for x in other]
        other += [self.vocab_size * h] * (1 if self.tie_word_embeddings else 2) + [h]
        return galore, other

    def num_params(self) -> int:
        g, o = self.matrices()
        return sum(m * n for m, n in g) + sum(o)


def _adam8bit_bytes(numel: int) -> float:
    if numel < _MIN_8BIT:
        return 8.0 * numel
    return 2.0 * numel + 2 * 4 * -(-numel // _BLOCK)


@dataclass
class Estimate:
    optimizer: str
    layerwise: bool
    zero_stage: int
    world_size: int
    accumulation: int
    parts: dict[str, float] = field(default_factory=dict)  # bytes
    first_grad: float = 0.0   # the first full gradient of backward (lm_head), bytes

    @property
    def total(self) -> float:
        """Sum of every term (bytes): the peak that CPU RSS shows. glibc keeps the pages freed
        by one phase (activations, logits) for the next (gradients, optimizer temporaries),
        so on CPU the terms add up (measured within 10%, benchmarks/memory.py)."""
        return sum(self.parts.values())

    @property
    def phase_peak(self) -> float:
        """Peak over the step's phases (bytes): what a caching GPU allocator can reach
        (torch.cuda.max_memory_allocated), a lower bound of `total`.

        stored mode: max(start of backward: activations + loss head + first gradient,
                         optimizer step: all gradients + update transients) on top of
                     weights + optimizer states + projectors.
        per-layer:   updates run inside backward, so every term can coexist (= total).
        """
        p = self.parts
        if self.layerwise:
            return self.total
        fixed = p["weights"] + p["optimizer_states"] + p["projectors"]
        backward = p["activations"] + p["loss_head"] + self.first_grad
        step = p["gradients"] + p["transients"]
        return fixed + max(backward, step)

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3)
                for k, v in {**self.parts, "total": self.total, "phase_peak": self.phase_peak}.items()}


def estimate(s: Shape, optimizer: str = "galore8bit", layerwise: bool = False, world_size: int = 1,
             zero_stage: int = 0, accumulation: int = 1, clipping: bool = False,
             activation_dtype: str | None = None, device: str = "cuda",
             activation_checkpointing: bool = False) -> Estimate:
    """Per-rank bytes of one training step (see the module docstring for every term).

    device="cpu" adds bitsandbytes' CPU 8-bit kernel temporaries (it dequantises the states
    of one tensor to fp32: m, v, grad, weight, sqrt(v), denominator and quantisation scratch,
    about 6.5 fp32 copies of the largest 8-bit tensor, or of UPDATE_CHUNK elements: the update
    runs in chunks); the CUDA kernel is fused.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")
    if layerwise and world_size > 1:
        raise ValueError("the per-layer mode is single-rank: use world_size=1")
    if layerwise and optimizer not in LOW_RANK:
        raise ValueError("the per-layer mode runs the low-rank optimizers")
    wb = DTYPE_BYTES[s.dtype]
    pb = min(wb, 4)  # projectors: 16-bit weights keep them in their dtype (projector.storage_dtype)
    ab = DTYPE_BYTES[activation_dtype or s.dtype]
    galore_m, other = s.matrices()
    if optimizer in ("adamw", "adam8bit"):   # every parameter full-rank
        other = other + [m * n for m, n in galore_m]
        galore_m = []
    P = s.num_params()
    r = APOLLO_MINI_RANK if optimizer == "apollo_mini" else s.rank   # whatever the recipe's rank
    lowrank = [max(m, n) * r for m, n in galore_m]
    projs = [min(m, n) * r for m, n in galore_m]
    N = world_size
    shard_states = N if zero_stage >= 1 else 1
    shard_grads = N if zero_stage >= 2 else 1
    shard_weights = N if zero_stage >= 3 else 1

    parts: dict[str, float] = {}
    parts["weights"] = P * wb / shard_weights

    # optimizer state
    if optimizer == "adamw":
        moments = 2.0 * wb * P
        proj = 0.0
    elif optimizer == "adam8bit":
        moments = sum(_adam8bit_bytes(n) for n in other)
        proj = 0.0
    elif optimizer in ("galore", "fira", "apollo", "apollo_mini"):
        # fp32 moments of R (the family adds one fp32 scalar per matrix: its limiter's norm);
        # APOLLO's random projector is kept between refreshes like GaLore's
        moments = 2.0 * 4 * sum(lowrank) + 2.0 * wb * sum(other) + (4.0 * len(lowrank) if optimizer in FULL_GRADIENT else 0.0)
        proj = pb * sum(projs)
    else:  # galore8bit
        moments = sum(_adam8bit_bytes(n) for n in lowrank) + sum(_adam8bit_bytes(n) for n in other)
        proj = pb * sum(projs)
    parts["optimizer_states"] = moments / shard_states
    parts["projectors"] = proj

    # gradients
    largest = max(other + [m * n for m, n in galore_m])
    if not layerwise:
        parts["gradients"] = P * wb / shard_grads
    else:
        g = largest * wb  # the one full gradient alive inside its hook
        if (accumulation > 1 or clipping) and optimizer in FULL_GRADIENT:
            g += P * wb   # they read the full gradient: autograd keeps each until the window ends
        elif accumulation > 1 or clipping:
            g += 4.0 * sum(lowrank) + wb * sum(other)
        parts["gradients"] = g

    # activations (micro-batch) and the loss head
    h, f, L, V = s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.vocab_size
    tokens = s.seq_len * s.micro_batch
    # transformers' LlamaRMSNorm saves its input upcast to fp32 (the same tensor in fp32 models)
    norm_in = 4 - ab
    per_layer = tokens * ((10 * h + 4 * f) * ab + 2 * h * norm_in)
    final_norm = tokens * h * (2 * ab + norm_in)
    if activation_checkpointing:   # layer inputs kept, one layer recomputed at a time
        parts["activations"] = L * tokens * h * ab + per_layer + final_norm
    else:
        parts["activations"] = L * per_layer + final_norm
    parts["loss_head"] = tokens * V * (ab + 3 * 4)

    # transients of the update: temporaries of the largest single update
    big_low = max(lowrank) if lowrank else 0
    max_other = max(other)
    if optimizer == "adamw":
        t = 2.0 * largest * wb                       # sqrt(v) and the denominator
    elif optimizer in ("galore", "fira", "apollo", "apollo_mini") and not layerwise:
        # GaLoreAdamW updates a param group in foreach batches of <= 2^24 elements, with one
        # reused buffer for m / (sqrt(v) + eps). fp32 weights project into a second reused
        # buffer; 16-bit weights get fresh fp32 projected grads (measured: the allocator keeps
        # every batch's pages). Full-rank groups: sqrt(v) and m / denom.
        low, batch = sum(lowrank), min(sum(lowrank), _FOREACH_BATCH)
        projected = batch if wb == 4 else low
        t = max(4.0 * (projected + batch), 2.0 * wb * sum(other))
    elif optimizer in ("galore", "fira", "apollo", "apollo_mini"):
        t = max(2.0 * max_other * wb, 3.0 * big_low * 4)   # per-layer: one parameter at a time
    elif optimizer == "galore8bit":
        t = 2.0 * big_low * 4                        # fp32 low-rank grad + update buffer
    else:
        t = 0.0
    if optimizer == "fira":
        t += max(m * n for m, n in galore_m) * wb   # its residual G - P R, one matrix at a time
    if device == "cpu" and optimizer in ("adam8bit", "galore8bit"):
        t += 6.5 * 4 * min(max(max_other, big_low), UPDATE_CHUNK)  # the kernel runs in chunks
    # under ZeRO-1+ the optimizer only updates this rank's partition
    parts["transients"] = t / shard_states
    first = s.vocab_size * h * wb
    return Estimate(optimizer, layerwise, zero_stage, world_size, accumulation, parts, first / shard_grads)


# ------------------------------------------------------------------------------------ CLI
def shape_from_config(path: str) -> tuple[Shape, dict[str, Any]]:
    with open(path) as fh:
        data = json.load(fh)
    m = data.get("model", {})
    d, t, g = data.get("data", {}), data.get("training", {}), data.get("galore", {})
    seq = d.get("seq_len", m.get("seq_len", m.get("max_position_embeddings", 256)))
    shape = Shape(
        hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
        vocab_size=m.get("vocab_size", 32000), seq_len=seq, micro_batch=t.get("micro_batch", 1),
        num_key_value_heads=m.get("num_key_value_heads"),
        tie_word_embeddings=m.get("tie_word_embeddings", False), dtype=m.get("dtype", "float32"),
        rank=g.get("rank", 128),
    )
    return shape, data


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m galore_ds.tools.estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a recipe JSON (model/data/training/galore sections)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--layers", type=int, dest="num_hidden_layers")
    p.add_argument("--heads", type=int, dest="num_attention_heads")
    p.add_argument("--kv-heads", type=int, dest="num_key_value_heads")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES))
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (per-layer accumulators)")
    p.add_argument("--clip", action="store_true",
                   help="exact gradient clipping (per-layer mode keeps low-rank grads); delayed clipping costs nothing")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: bitsandbytes' unfused 8-bit kernel")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute layers in backward (default: the config's model.activation_checkpointing)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "seq_len", "micro_batch", "rank", "dtype")
    explicit = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    checkpointing = args.activation_checkpointing
    if args.config:
        shape, data = shape_from_config(args.config)
        shape = Shape(**{**asdict(shape), **explicit})
        checkpointing = checkpointing or bool(data.get("model", {}).get("activation_checkpointing"))
    else:
        missing = [k for k in fields[:4] + ("vocab_size",) if k not in explicit]
        if missing:
            print(f"error: without --config give --{' --'.join(x.replace('_', '-') for x in missing)}",
                  file=sys.stderr)
            return 2
        shape = Shape(**explicit)
    N = args.world_size
    rows = []
    for opt in OPTIMIZERS:
        stages = (0,) if N == 1 else (0, 1, 2, 3)
        for z in stages:
            rows.append(estimate(shape, opt, False, N, z, args.accumulation, args.clip, None,
                                 args.device, checkpointing))
        if N == 1 and opt in LOW_RANK:
            rows.append(estimate(shape, opt, True, 1, 0, args.accumulation, args.clip, None,
                                 args.device, checkpointing))
    if args.json:
        print(json.dumps({"shape": asdict(shape), "params": shape.num_params(), "world_size": N,
                          "activation_checkpointing": checkpointing,
                          "rows": [{"optimizer": e.optimizer, "layerwise": e.layerwise,
                                    "zero_stage": e.zero_stage, "gib": e.gib()} for e in rows]}, indent=1))
        return 0
    print(f"LLaMA {shape.num_params() / 1e6:.1f}M params, h={shape.hidden_size} f={shape.intermediate_size} "
          f"L={shape.num_hidden_layers} V={shape.vocab_size}, seq {shape.seq_len} x micro-batch "
          f"{shape.micro_batch}, rank {shape.rank}, {shape.dtype}, world size {N}"
          f"{', activation checkpointing' if checkpointing else ''} (GiB per rank)")
    cols = ("weights", "gradients", "optimizer_states", "projectors", "activations", "loss_head", "transients")
    head = f"{'optimizer':<12}{'mode':<10}" + "".join(f"{c[:10]:>11}" for c in cols) + f"{'total':>9}{'phase-pk':>9}"
    print(head)
    for e in rows:
        mode = "per-layer" if e.layerwise else (f"zero-{e.zero_stage}" if N > 1 else "stored")
        g = e.gib()
        print(f"{e.optimizer:<12}{mode:<10}" + "".join(f"{g[c]:>11.2f}" for c in cols) + f"{g['total']:>9.2f}{g['phase_peak']:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
