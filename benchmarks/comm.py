"""Bytes per optimizer step of GaLore's replicated engine (engine.mode=ddp) against DDP, ZeRO-2,
FSDP2 and torch's PowerSGD hook, on the paper's LLaMA shapes, and a step-time model for RTX 4090s:
pure arithmetic (no torch), seconds to run.

    python benchmarks/comm.py [--out benchmarks/results/comm.json]

Writes the JSON and comm.png (scaling efficiency vs world size, one panel per link) beside it
and prints the README tables. GB = 1e9 bytes.

Convention: bytes a rank SENDS per optimizer step under bandwidth-optimal ring algorithms,
  all_reduce of a P-byte tensor            2 (W-1)/W x P
  reduce_scatter of a P-byte input         (W-1)/W x P    (the input holds all W shards)
  all_gather of a P-byte per-rank input    (W-1) x P      (= (W-1)/W of the gathered output)
  reduce / broadcast of a P-byte tensor    P              (pipelined: each rank passes it on once)
`Collective.payload` is the tensor handed to the call, what galore_ds.layouts.comm's
benchmarks/collectives.py's count_collectives records, so a test can compare payloads exactly and sent bytes by the rule
above. Scalar collectives (loss mean, gradient norm: bytes) are left out.

Per method (gradients reduced once per optimizer step; accumulation stays local):
  ddp       all_reduce of every gradient.
  zero2     reduce_scatter of the flat gradients + all_gather of the updated flat parameters
            (padded to a multiple of W; DeepSpeed stage 2 reduces at every micro-batch: x k).
  fsdp2     decoder layers: all_gather in forward and again in backward (reshard_after_forward),
            reduce_scatter of gradients; the root (embeddings, lm_head, final norm) is gathered
            once (FSDP2 keeps it unsharded into backward). Shard(0): ceil(rows/W) rows a rank.
  powersgd  torch's powerSGD_hook, steady state: a tensor viewed as rows x rest is compressed
            when (rows + rest) r' x min_compression_rate (2) < rows x rest, r' = min(rows, rest, r)
            (embeddings and lm_head too, 1-D never): all_reduce of P (rows x r') and Q (rest x r');
            the others in one uncompressed all_reduce.
  galore    engine.mode=ddp: all_reduce of R per GaLore matrix (right: m x r, left: r x n; std
            projects the smaller side, so R is max(m,n) x r, reverse_std min(m,n) x r) and of the
            full gradients of the rest, in engine.ddp.reduce_dtype: wire 4 (float32), 2 (bfloat16)
            or 8 (float64, per-layer). Refresh (extra, fp32):
            svd: each matrix's owner fixed by LPT over all GaLore matrices on m n min(m,n)
              (optimizer.replicated_owner). A call whose due matrices have several owners: ONE
              reduce_scatter of a W x width buffer (width = the most-loaded owner's elements,
              zero-padded), ONE all_gather of [flags | bases] padded to the largest share. A call
              with one owner (per-layer mode refreshes one matrix per call; a stagger group may
              land on one rank): a reduce of the gradients to it and a broadcast of its bases.
            randomized: per subspace-iteration round, all_reduces of Y = G X (rows x k) and
              G^T Y (dim x k); warm: power_iters + 1 rounds, k = r + oversample (power_iters
              rounds, k = r, if oversample = 0); cold (first refresh): first_power_iters + 1
              rounds, k = r + max(oversample, 8). Defaults here 1, 8, 4: the recipe's oversample was 8
              when results/comm.json was measured; it is 0 now (galore_ds/core/settings.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAPER_MODELS  # noqa: E402  (shapes only; no torch)

WORLDS = (2, 4, 8)
GAP = 500  # update_proj_gap T of the 7B recipe; every model is averaged over the same window
# The paper's GaLore ranks (its Table 2 runs 1B at 512; common.py's "1b" carries the recipe's 1024).
PAPER_RANKS = {"60m": 128, "350m": 256, "1b": 512, "7b": 1024}
SWEEP_7B = (128, 256, 512, 1024)
WIRES = {"bf16": 2, "fp32": 4}
LINKS = {"PCIe 4.0 x16": 24e9, "100 GbE": 100e9 / 8, "25 GbE": 25e9 / 8, "10 GbE": 10e9 / 8}
LINK_EFFICIENCY = 0.8
STEP_TOKENS = 512 * 256                      # the paper's global batch: 512 sequences of 256
TOKENS_4090 = 150_000 * STEP_TOKENS / (90 * 86400)  # 7B on C4 in ~3 months on one 4090: 2528 tok/s


@dataclass(frozen=True)
class ParamShape:
    """A parameter as the engine sees it: name, global shape (torch layout, Linear = out x in),
    whether GaLore targets it (core/groups.py: nn.Linear weights under attn/mlp)."""

    name: str
    shape: tuple[int, ...]
    galore: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Collective:
    """`calls` collectives of kind `op` whose handed-over tensors total `payload` bytes."""

    op: str  # all_reduce | reduce_scatter | all_gather | reduce | broadcast
    payload: int
    what: str
    calls: int = 1

    def sent(self, world: int) -> float:
        if self.op == "all_reduce":
            return 2 * (world - 1) / world * self.payload
        if self.op == "reduce_scatter":
            return (world - 1) / world * self.payload
        if self.op in ("reduce", "broadcast"):
            return self.payload
        return (world - 1) * self.payload


@dataclass
class Traffic:
    """One rank's collectives: `step` on every optimizer step, `refresh` added on a refresh step."""

    world: int
    step: list[Collective] = field(default_factory=list)
    refresh: list[Collective] = field(default_factory=list)

    def step_bytes(self) -> float:
        return sum(c.sent(self.world) for c in self.step)

    def refresh_extra(self) -> float:
        return sum(c.sent(self.world) for c in self.refresh)

    def average(self, gap: int = GAP) -> float:
        """Mean over a window of `gap` steps that refreshes every matrix once (stagger or not)."""
        return self.step_bytes() + self.refresh_extra() / gap


def llama_shapes(hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 vocab_size: int = 32000, galore_lm_head: bool = False, **_: object) -> list[ParamShape]:
    """LlamaForCausalLM's parameters in named_parameters order (untied, no biases, no GQA).
    galore_lm_head: lm_head is a GaLore matrix too (galore.target_modules + "lm_head"; not the paper's)."""
    h, f = hidden_size, intermediate_size
    out = [ParamShape("model.embed_tokens.weight", (vocab_size, h))]
    for i in range(num_hidden_layers):
        pre = f"model.layers.{i}."
        out += [ParamShape(f"{pre}self_attn.{x}_proj.weight", (h, h), True) for x in "qkvo"]
        out += [ParamShape(f"{pre}mlp.gate_proj.weight", (f, h), True),
                ParamShape(f"{pre}mlp.up_proj.weight", (f, h), True),
                ParamShape(f"{pre}mlp.down_proj.weight", (h, f), True),
                ParamShape(f"{pre}input_layernorm.weight", (h,)),
                ParamShape(f"{pre}post_attention_layernorm.weight", (h,))]
    return out + [ParamShape("model.norm.weight", (h,)), ParamShape("lm_head.weight", (vocab_size, h), galore_lm_head)]


def side(shape: tuple[int, ...], proj_type: str) -> str:
    """core/projector.choose_side: std projects right when m >= n, reverse_std the other way."""
    if proj_type in ("left", "right"):
        return proj_type
    right = shape[0] >= shape[1]
    return ("right" if right else "left") if proj_type == "std" else ("left" if right else "right")


def assign_owners(costs: list[float], world: int) -> list[int]:
    """layouts/comm.assign_owners without holders: LPT, largest cost first, least-loaded rank."""
    load, owners = [0.0] * world, [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        owners[j] = min(range(world), key=lambda r: (load[r], r))
        load[owners[j]] += costs[j]
    return owners


def _svd_refresh(mats: list[ParamShape], owners: list[int], rank: int, world: int, proj_type: str,
                 refresh_bytes: int) -> list[Collective]:
    """layouts/refresh._owner_from_contributions for one refresh call over `mats`, whose
    owners were fixed over all matrices (optimizer.replicated_owner)."""
    dims = [p.shape[1] if side(p.shape, proj_type) == "right" else p.shape[0] for p in mats]
    if len(set(owners)) == 1:  # comm.reduce_to_owners / share_from_owners with a single owner
        return [Collective("reduce", sum(p.numel for p in mats) * refresh_bytes, "summed gradients to the owner"),
                Collective("broadcast", sum(1 + rank * d for d in dims) * 4, "projectors from the owner (fp32)")]
    width = max(sum(p.numel for p, o in zip(mats, owners) if o == r) for r in range(world))
    share = max(sum(1 + rank * d for d, o in zip(dims, owners) if o == r) for r in range(world))
    return [Collective("reduce_scatter", world * width * refresh_bytes, "summed gradients to owners"),
            Collective("all_gather", share * 4, "projectors from owners (fp32)")]


def _randomized_refresh(mats: list[ParamShape], rank: int, proj_type: str, refresh_bytes: int,
                        oversample: int, power_iters: int, first_power_iters: int,
                        cold: bool) -> Collective:
    """layouts/refresh._subspace with per-rank contributions for one refresh call over `mats`."""
    if cold:
        rounds, extra = first_power_iters + 1, max(oversample, 8)
    elif oversample > 0:
        rounds, extra = power_iters + 1, oversample
    else:
        rounds, extra = max(power_iters, 1), 0
    elems = 0
    for p in mats:
        m, n = p.shape
        dim = n if side(p.shape, proj_type) == "right" else m
        elems += rounds * (m + n) * min(rank + extra, dim)
    return Collective("all_reduce", elems * refresh_bytes, "subspace Gram products", calls=2 * rounds)


def predicted_bytes(shapes: list[ParamShape], rank: int, world: int, method: str, *,
                    wire_bytes: int = 4, proj_type: str = "std", refresh: str = "svd",
                    per_layer: bool = False, stagger: bool = False, update_proj_gap: int = GAP,
                    refresh_bytes: int = 4, oversample: int = 8, power_iters: int = 1,
                    first_power_iters: int = 4, cold: bool = False,
                    reshard_after_forward: bool = True, min_compression_rate: float = 2.0) -> Traffic:
    """The collectives one rank issues per optimizer step (module docstring for each method).

    shapes: every trainable parameter (`llama_shapes`, or a test's
      [ParamShape(n, tuple(p.shape), n in galore_matrix_names(model)) for n, p in ...]).
    rank: GaLore rank, or PowerSGD's matrix_approximation_rank; a GaLore-targeted matrix with
      a side below `rank` is trained full-rank (core/groups.param_groups).
    method: ddp | zero2 | fsdp2 | powersgd | galore.
    wire_bytes: bytes per element of the gradients (and of ZeRO/FSDP parameters) on the wire.
    GaLore only: proj_type, refresh (svd | randomized), per_layer (engine.ddp.layerwise: one
      refresh call per matrix), stagger and update_proj_gap (which matrices refresh together),
      refresh_bytes (8 with reduce_dtype=float64), the randomized program's oversample /
      power_iters / first_power_iters, and `cold` for the first refresh instead of a warm one.
    Returns a Traffic; .step_bytes(), .refresh_extra(), .average(T) give bytes sent, and each
    Collective's payload is what benchmarks/collectives.py's count_collectives records (summed over its `calls`; the step
    traffic of DDP-style methods goes out in buckets, counted here as one call).
    """
    traffic = Traffic(world)
    if world == 1:
        return traffic
    total = sum(p.numel for p in shapes)
    if method == "ddp":
        traffic.step = [Collective("all_reduce", total * wire_bytes, "gradients")]
    elif method == "zero2":
        shard = -(-total // world)
        traffic.step = [Collective("reduce_scatter", world * shard * wire_bytes, "gradients"),
                        Collective("all_gather", shard * wire_bytes, "updated parameters")]
    elif method == "fsdp2":
        def shard(ps: list[ParamShape]) -> int:
            return sum(-(-p.shape[0] // world) * (p.numel // p.shape[0]) for p in ps)
        layers = [p for p in shapes if ".layers." in p.name]
        root = [p for p in shapes if ".layers." not in p.name]
        n_layers = len({p.name.split(".layers.")[1].split(".")[0] for p in layers})
        gathers = 2 if reshard_after_forward else 1
        traffic.step = [
            Collective("all_gather", gathers * shard(layers) * wire_bytes, "layer parameters", gathers * n_layers),
            Collective("all_gather", shard(root) * wire_bytes, "root parameters"),
            Collective("reduce_scatter", world * shard(shapes) * wire_bytes, "gradients", n_layers + 1)]
    elif method == "powersgd":
        ps = qs = plain = 0
        for p in shapes:
            rows = p.shape[0]
            rest = p.numel // rows
            r = min(rows, rest, rank)
            if (rows + rest) * r * min_compression_rate < rows * rest:
                ps, qs = ps + rows * r, qs + rest * r
            else:
                plain += p.numel
        traffic.step = [Collective("all_reduce", plain * wire_bytes, "uncompressed tensors"),
                        Collective("all_reduce", ps * wire_bytes, "P"),
                        Collective("all_reduce", qs * wire_bytes, "Q")]
    elif method == "galore":
        mats = [p for p in shapes if p.galore and len(p.shape) == 2 and min(p.shape) >= rank]
        low = sum(rank * (p.shape[0] if side(p.shape, proj_type) == "right" else p.shape[1]) for p in mats)
        full = total - sum(p.numel for p in mats)
        traffic.step = [Collective("all_reduce", (low + full) * wire_bytes, "R + full non-GaLore gradients")]
        owner = dict(zip((p.name for p in mats),
                         assign_owners([float(m * n * min(m, n)) for m, n in (p.shape for p in mats)], world)))
        if per_layer:
            calls = [[p] for p in mats]
        elif stagger:  # core/groups.refresh_offset: matrices sharing an offset refresh together
            by_offset: dict[int, list[ParamShape]] = {}
            for pos, p in enumerate(mats):
                by_offset.setdefault(pos * update_proj_gap // len(mats), []).append(p)
            calls = list(by_offset.values())
        else:
            calls = [mats]
        for due in calls:
            if refresh == "svd":
                traffic.refresh += _svd_refresh(due, [owner[p.name] for p in due], rank, world, proj_type,
                                                refresh_bytes)
            else:
                traffic.refresh.append(_randomized_refresh(due, rank, proj_type, refresh_bytes, oversample,
                                                           power_iters, first_power_iters, cold))
    else:
        raise ValueError(f"method={method!r}: expected ddp, zero2, fsdp2, powersgd or galore")
    return traffic


def byte_rows(model: str, rank: int, world: int) -> list[dict]:
    """Every method at one (model, rank, W), with its ratio to bf16 DDP (averaged over GAP)."""
    shapes = llama_shapes(**PAPER_MODELS[model])
    ddp = predicted_bytes(shapes, rank, world, "ddp", wire_bytes=2).average()
    runs = [(m, w, {}) for m in ("ddp", "zero2", "fsdp2", "powersgd") for w in WIRES]
    runs += [("galore", w, dict(proj_type=pt, refresh=rf, per_layer=pl))
             for pt in ("std", "reverse_std") for rf, pl in (("svd", False), ("svd", True), ("randomized", False))
             for w in WIRES]
    # lm_head projected too: galore.target_modules=["attn", "mlp", "lm_head"], a recipe option
    runs += [("galore", "bf16", dict(proj_type="reverse_std", refresh="svd", per_layer=False, lm_head=True))]
    shapes_lm_head = llama_shapes(**PAPER_MODELS[model], galore_lm_head=True)
    rows = []
    for method, wire, opts in runs:
        opts = dict(opts)
        lm_head = opts.pop("lm_head", False)
        t = predicted_bytes(shapes_lm_head if lm_head else shapes, rank, world, method, wire_bytes=WIRES[wire], **opts)
        if method == "galore":
            opts["lm_head"] = lm_head
        rows.append(dict(model=model, rank=rank, world=world, method=method, wire=wire, **opts,
                         step_bytes=t.step_bytes(), refresh_step_bytes=t.step_bytes() + t.refresh_extra(),
                         avg_bytes=t.average(), ratio_vs_ddp_bf16=ddp / t.average()))
    return rows


def step_time(avg_bytes: float, world: int, link_rate: float) -> dict:
    """No overlap: compute + comm; full overlap: max(compute, comm). Efficiency vs W x one 4090."""
    compute = STEP_TOKENS / world / TOKENS_4090
    comm = avg_bytes / (LINK_EFFICIENCY * link_rate)
    out = dict(compute_s=compute, comm_s=comm)
    for name, t in (("no_overlap", compute + comm), ("overlap", max(compute, comm))):
        out[f"tokens_per_s_{name}"] = STEP_TOKENS / t
        out[f"efficiency_{name}"] = STEP_TOKENS / t / (world * TOKENS_4090)
    return out


TIMED = {  # label -> (method, wire, galore options); rank 1024, svd refresh, comm-hook mode
    "DDP bf16": ("ddp", "bf16", {}),
    "ZeRO-2 bf16": ("zero2", "bf16", {}),
    "GaLore ddp std bf16": ("galore", "bf16", dict(proj_type="std")),
    "GaLore ddp reverse_std bf16": ("galore", "bf16", dict(proj_type="reverse_std")),
    "GaLore ddp std fp32": ("galore", "fp32", dict(proj_type="std")),
}

ASSUMPTIONS = [
    "bytes sent per rank under ring algorithms: all_reduce 2(W-1)/W x payload, reduce_scatter "
    "(W-1)/W x its full input, all_gather (W-1) x its per-rank input; latency and scalar collectives ignored",
    "gradients are reduced once per optimizer step (local accumulation); DeepSpeed ZeRO-2 actually "
    "reduce-scatters at every micro-batch, so its gradient half grows with the accumulation steps",
    "GaLore ddp sends projected and full gradients in engine.ddp.reduce_dtype (fp32 default; bf16 rounds "
    "the sum over ranks to bf16, as DDP's bf16 compression); refresh traffic is fp32 in both",
    f"averages are over a T = {GAP} window with one refresh of every matrix (warm refresh for randomized); "
    "the cold first randomized refresh (first_power_iters + 1 rounds) happens once per run and is not averaged in",
    "PowerSGD: torch's powerSGD_hook defaults (min_compression_rate 2, every 2-D tensor incl. embeddings), "
    "steady state after start_powerSGD_iter",
    "link time = bytes sent / (0.8 x link rate); PCIe 4.0 x16 24e9 B/s, 100/25/10 GbE 12.5e9/3.125e9/1.25e9 B/s; "
    "RTX 4090s have no P2P, so PCIe traffic goes through host memory and may be slower",
    f"compute: one 4090 trains 7B at {TOKENS_4090:.0f} tokens/s (the paper's ~3 months for 150k steps x 512 x 256 "
    "tokens), the same for every method; per-rank step = 512 x 256 / W tokens; refresh compute (SVD) excluded",
    "no overlap of compute and communication (overlap: full-overlap bound max(compute, comm))",
    "memory feasibility is not modelled: DDP and ZeRO-2 with AdamW do not fit 7B on a 24 GB 4090; their rows "
    "show communication only",
]


def markdown(rows: list[dict], timing: list[dict], targets: list[dict]) -> str:
    gb = 1e9
    pick = {(r["method"], r["wire"], r["rank"], r.get("proj_type"), r.get("refresh"), r.get("per_layer"),
             r.get("lm_head")): r for r in rows if r["model"] == "7b" and r["world"] == 8}
    lines = ["7B, W = 8: GB sent per rank per optimizer step (ring), mean over T = 500 (one refresh)", "",
             "| method | wire | rank | GB/step | refresh step GB | vs DDP bf16 |", "|---|---|---|---|---|---|"]
    table = [("DDP", "ddp", 1024, None), ("ZeRO-2", "zero2", 1024, None), ("FSDP2", "fsdp2", 1024, None),
             ("PowerSGD", "powersgd", 1024, None), ("PowerSGD", "powersgd", 256, None)]
    table += [(f"GaLore ddp {pt}", "galore", rk, pt) for rk in (1024, 256) for pt in ("std", "reverse_std")]
    for label, method, rank, pt in table:
        for wire in WIRES:
            if method == "ddp" or method == "galore" or wire == "bf16":
                r = pick[(method, wire, rank, pt, "svd" if pt else None, False if pt else None, False if pt else None)]
                rk = rank if method in ("powersgd", "galore") else "-"
                lines.append(f"| {label} | {wire} | {rk} | {r['avg_bytes'] / gb:.2f} | "
                             f"{r['refresh_step_bytes'] / gb:.2f} | {r['ratio_vs_ddp_bf16']:.2f}x |")
    for rank in (1024, 256):
        r = pick[("galore", "bf16", rank, "reverse_std", "svd", False, True)]
        lines.append(f"| GaLore ddp reverse_std, lm_head projected too | bf16 | {rank} | {r['avg_bytes'] / gb:.2f} | "
                     f"{r['refresh_step_bytes'] / gb:.2f} | {r['ratio_vs_ddp_bf16']:.2f}x |")
    shapes = llama_shapes(**PAPER_MODELS["7b"])
    full = sum(p.numel for p in shapes if not p.galore)
    cap = sum(p.numel for p in shapes) / full
    lines += ["", "GaLore: svd refresh, comm-hook mode; wire = engine.ddp.reduce_dtype. Embeddings, lm_head "
              f"and norms ({full / 1e6:.0f}M params) go in full: the ratio is capped at {cap:.1f}x ({cap / 2:.1f}x "
              "with an fp32 wire) even if GaLore matrices sent nothing. Targets (all refresh modes in the JSON):", ""]
    for t in (t for t in targets if t["refresh"] == "svd" and not t["per_layer"]):
        lines.append(f"- rank {t['rank']} {t['proj_type']} {t['wire']}{' lm_head projected' if t['lm_head'] else ''}: "
                     f"{t['ratio']:.2f}x vs target {t['target']}x: "
                     f"{'met' if t['met'] else 'NOT met'}")
    lines += ["", "7B on W x RTX 4090, rank 1024: tokens/s and scaling efficiency (no overlap / full overlap)", "",
              "| method | link | W | comm s/step | tokens/s | efficiency | overlap bound |", "|---|---|---|---|---|---|---|"]
    for t in timing:
        if t["world"] == 8:
            lines.append(f"| {t['method']} | {t['link']} | 8 | {t['comm_s']:.2f} | {t['tokens_per_s_no_overlap']:.0f} | "
                         f"{t['efficiency_no_overlap']:.0%} | {t['efficiency_overlap']:.0%} |")
    return "\n".join(lines)


def plot(timing: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LINKS), figsize=(4 * len(LINKS), 3.6), sharey=True)
    for ax, link in zip(axes, LINKS):
        for label in TIMED:
            pts = [(t["world"], t["efficiency_no_overlap"]) for t in timing if t["link"] == link and t["method"] == label]
            dashed = label.startswith("ZeRO")  # sends what DDP sends: dashed, so both lines show
            ax.plot([1] + [w for w, _ in pts], [1.0] + [e for _, e in pts], "s--" if dashed else "o-", label=label)
        ax.set_title(f"7B, {link}")
        ax.set_xlabel("RTX 4090s (W)")
        ax.set_xticks([1, *WORLDS])
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("scaling efficiency (no overlap)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "comm.json")
    args = parser.parse_args()

    configs = [(m, rk) for m, rk in PAPER_RANKS.items()] + [("7b", rk) for rk in SWEEP_7B if rk != PAPER_RANKS["7b"]]
    rows = [row for m, rk in configs for w in WORLDS for row in byte_rows(m, rk, w)]
    targets = [dict(rank=r["rank"], proj_type=r["proj_type"], wire=r["wire"], refresh=r["refresh"],
                    per_layer=r["per_layer"], lm_head=r["lm_head"], ratio=r["ratio_vs_ddp_bf16"], target=goal,
                    met=r["ratio_vs_ddp_bf16"] >= goal)
               for goal, rank in ((4, 1024), (16, 256)) for r in rows
               if r["model"] == "7b" and r["world"] == 8 and r["method"] == "galore" and r["rank"] == rank]
    shapes7 = llama_shapes(**PAPER_MODELS["7b"])
    non_galore = sum(p.numel for p in shapes7 if not p.galore)
    timing = []
    for label, (method, wire, opts) in TIMED.items():
        for w in WORLDS:
            avg = predicted_bytes(shapes7, 1024, w, method, wire_bytes=WIRES[wire], **opts).average()
            for link, rate in LINKS.items():
                timing.append(dict(method=label, link=link, world=w, avg_bytes=avg, **step_time(avg, w, rate)))
    models = {m: dict(params=sum(p.numel for p in s), galore_params=sum(p.numel for p in s if p.galore),
                      non_galore_params=sum(p.numel for p in s if not p.galore), paper_rank=PAPER_RANKS[m])
              for m, s in ((m, llama_shapes(**PAPER_MODELS[m])) for m in PAPER_RANKS)}
    result = dict(
        convention=__doc__.split("Convention: ")[1].split("\n\n")[0],
        assumptions=ASSUMPTIONS, update_proj_gap=GAP, tokens_per_s_one_4090=TOKENS_4090, models=models,
        cap=dict(note="embeddings + lm_head + norms go in full: the ratio vs same-dtype DDP cannot exceed "
                      "params / non-GaLore params, even if GaLore matrices sent nothing",
                 ratio_cap_7b_same_dtype=models["7b"]["params"] / non_galore,
                 ratio_cap_7b_fp32_wire_vs_bf16_ddp=models["7b"]["params"] / non_galore / 2,
                 note_exact="with refreshes free, the smallest exact message of a GaLore matrix is rank x "
                            "its shorter side: the bound at each rank, same wire dtype as DDP",
                 ratio_bound_7b_exact={rk: models["7b"]["params"] / (non_galore + sum(
                     rk * min(p.shape) for p in shapes7 if p.galore)) for rk in SWEEP_7B}),
        targets=targets, bytes=rows, step_time=timing,
        galore_7b_w8_example=asdict(predicted_bytes(shapes7, 1024, 8, "galore")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(timing, args.out.with_suffix(".png"))
    print(markdown(rows, timing, targets))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
