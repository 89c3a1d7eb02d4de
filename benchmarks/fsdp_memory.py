"""Per-rank peak memory of GaLore on FSDP2: per-layer mode vs stored-gradient mode (CPU, gloo).

    .venv/bin/python benchmarks/fsdp_memory.py            # 60M and 130M, W 2 and 4 (15 min, 2 cores)
    .venv/bin/python benchmarks/fsdp_memory.py --quick    # tiny LLaMA, W=2, both modes (~15 s)
    .venv/bin/python benchmarks/fsdp_memory.py --models 350m --worlds 2 --optimizers galore_adamw8bit
    .venv/bin/python benchmarks/fsdp_memory.py --root-reshard true   # the root resharded too
    .venv/bin/python benchmarks/fsdp_memory.py --table    # the stored results as markdown

The launcher starts one fresh torchrun job per configuration (model, W, optimizer, mode: W gloo
ranks on CPU, one torch thread each, OMP_NUM_THREADS=1), because a process's resident set keeps
what the allocator did not give back, and merges every rank's record into
benchmarks/results/fsdp_memory.json: a run replaces the stored one with the same model, W,
optimizer, mode and settings, others are kept (--fresh starts the file anew; --quick writes to
the temp dir unless --out is given). One job by hand (rank 0 prints a RESULT line):
    torchrun --standalone --nproc_per_node W benchmarks/fsdp_memory.py --child MODEL OPT MODE

What each rank runs, as the FSDP engine (galore_ds/train/engine_fsdp.py) with its defaults: a
LLaMA from galore_ds.train.model built on CPU in bf16 (the recipes' model.dtype), fully_shard of every
decoder layer and then of the root, MixedPrecisionPolicy(param_dtype=fp32, reduce_dtype=fp32)
(weight and gradient shards are bf16; the all-gathered weights of forward/backward and the
reduce-scatter are fp32), reshard_after_forward=True for the layers and FSDP2's own default for
the root, which keeps its weights (embedding, lm_head, final norm) unsharded from forward to
backward (--root-reshard true reshards it too, as the engine did before 2026-11-24). GaLore on every attention and MLP matrix
(galore_ds.param_groups, the paper's ranks: 128 for 60M, 256 for 130M and 350M), embedding,
lm_head and norms full-rank; seq 256, micro-batch 1 per rank, no clipping, no accumulation.
  stored     GaLoreAdamW(8bit): backward stores every bf16 gradient shard, then step()
             (owner refresh: one all_to_all of all due matrices, one all_gather of the Qs).
  layerwise  LayerwiseOptimizer over the same optimizer: each shard is updated inside the
             hook FSDP2 runs after its group's reduce-scatter and freed there (immediate mode:
             no clipping, one micro-batch; each matrix refreshes from its own hook).
update_proj_gap is 2: step 0 (first refresh, creates the state) is the warm-up, steps 1 (no
refresh) and 2 (refresh) are measured (--warmup, --measure, --gap). Refresh method "randomized"
(owner mode), as in benchmarks/memory.py: exact SVDs of every matrix would take minutes per
refresh on 2 shared cores; either way the basis is computed one matrix at a time.

Memory: Linux's VmHWM, reset (/proc/self/clear_refs = 5) before each phase of each step
(forward, backward, optimizer step); "delta" = peak minus the rank's RSS before the model was
built (after torch, transformers, bitsandbytes, the gloo group and a warm-up op). Inside
backward, a post-accumulate-grad hook on each FSDP group's last parameter (FSDP2 calls it right
after that group's reduce-scatter, in both modes; in per-layer mode after the optimizer's hook)
records RSS and the peak so far: "peak_before_any_layer_grad" (at the first decoder layer's
reduce-scatter, when neither mode holds a gradient shard yet) and "rss_at_root_reduce_scatter"
(the last group: stored mode then holds every shard, per-layer mode only the root's).
glibc is pinned so that RSS follows the live bytes (set by the launcher, recorded per run):
MALLOC_MMAP_THRESHOLD_=65536 (every block >= 64 KiB is its own mmap, unmapped when freed;
glibc's default threshold climbs to 32 MiB after the first large free, and from then on freed
tensors stay resident in the heap: with the defaults (--malloc default) the 60M W=2 AdamW peaks
read 1.10 GiB stored and 1.15 GiB per-layer instead of 0.64 and 0.61), MALLOC_TRIM_THRESHOLD_=
131072, MALLOC_ARENA_MAX=2 (gloo's threads would otherwise get arenas of their own). The price
is page faults: steps run about 2x slower than with the defaults (times are not the point here).

Analytic numbers (exact, per rank, from the tensors themselves): parameter shard bytes;
gradient shard bytes, all of them (what stored mode holds from the end of backward through
step()) and per FSDP group (FSDP2 views a group's shards into one reduce-scatter output, so
per-layer mode holds at most the largest group's: here the root's, embedding + lm_head);
expected_saving = all gradient shards - the largest group's (= the decoder layers' shards);
optimizer state bytes (every tensor in optimizer.state, DTensors as their local shard, 8-bit
codes and absmax included); GaLoreAdamW's persistent foreach scratch buffers (not state: the
stored step batches every parameter of a group, the per-layer step one parameter at a time).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import PAPER_MODELS, proc_status, reset_peak  # noqa: E402

MODELS = {  # the paper's LLaMA shapes (vocab 32000) and ranks; "tiny" for --quick
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=2048, rank=32),
    **{name: PAPER_MODELS[name] for name in ("60m", "130m", "350m")},
}
OPTIMIZERS = ("galore_adamw", "galore_adamw8bit")
MODES = ("stored", "layerwise")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}
GIB, MIB = 2**30, 2**20


# ---------------------------------------------------------------------------- rank side
def _tensor_bytes(obj, seen: set) -> int:
    """Bytes of every distinct tensor storage in obj (dicts, lists, DTensors as local shards)."""
    import torch

    from galore_ds.layouts.base import local_tensor

    if torch.is_tensor(obj):
        t = local_tensor(obj)
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen or t.untyped_storage().nbytes() == 0:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def analytic(model, opt) -> dict:
    """Exact per-rank byte counts from the sharded model and the optimizer's tensors."""
    from galore_ds.layouts.base import local_tensor

    param_bytes = sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in model.parameters())
    # gradient shards have the sharded parameter's dtype (bf16); FSDP2 views them into one
    # flat reduce-scatter output per group, so a group's shards live and die together
    # groups: [FSDP module, its parameters, their gradient shard bytes on this rank]
    groups = [[name, len(own), sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in own)]
              for name, own in _fsdp_groups(model)]
    grads_all = sum(g[2] for g in groups)
    largest = max(groups, key=lambda g: g[2])
    state = _tensor_bytes(opt.state, set()) if opt is not None else 0
    scratch = _tensor_bytes(getattr(opt, "__dict__", {}).get("_scratch_buffers", {}), set())
    return {"param_shard_bytes": param_bytes,
            "grad_shard_bytes_stored": grads_all,
            "grad_shard_bytes_layerwise_max": largest[2],
            "largest_group": largest[0],
            "expected_saving_bytes": grads_all - largest[2],
            "decoder_layer_grad_shard_bytes": sum(g[2] for g in groups if g[0] != "<root>"),
            "optimizer_state_bytes": state,
            "optimizer_scratch_bytes": scratch,
            "groups": groups}


def _fsdp_groups(model) -> list:
    """(name, [its own parameters]) for every FSDP2 module (parameters not under a nested one)."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, FSDPModule):
            own = [p for n, p in mod.named_parameters()
                   if not any(isinstance(m, FSDPModule) and m is not mod for m in _owners(mod, n))]
            out.append((name or "<root>", own))
    return out


def _group_last_params(model) -> list:
    return [(name, own[-1]) for name, own in _fsdp_groups(model) if own]


def _owners(root, pname: str):
    """Modules on the path from `root` to parameter `pname` (excluding root)."""
    mod, out = root, []
    for part in pname.split(".")[:-1]:
        mod = getattr(mod, part) if not part.isdigit() else mod[int(part)]
        out.append(mod)
    return out


def run_rank(model_name: str, opt_name: str, mode: str, args) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    importlib.import_module("bitsandbytes")  # loaded before the baseline (the 8-bit rule needs it)
    from galore_ds import param_groups
    from galore_ds.train.config import ModelConfig
    from galore_ds import GaLoreAdamW, GaLoreAdamW8bit, LayerwiseOptimizer
    from galore_ds.train.model import DTYPES, build_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # warm up what every step uses (kernels, autograd, a collective) so its one-time
    # allocations fall into the baseline
    w = torch.randn(64, 64, requires_grad=True)
    (w @ w).sum().backward()
    dist.all_reduce(torch.ones(4))
    dist.barrier()
    baseline = proc_status("VmRSS")

    spec = dict(MODELS[model_name])
    r = spec.pop("rank")
    mcfg = ModelConfig(**spec, max_position_embeddings=max(args.seq, 256), dtype=args.dtype)
    model = build_model(mcfg, seed=0, meta=False)   # on CPU, as FSDPEngine (wants_meta_model=False)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[args.param_dtype], reduce_dtype=DTYPES[args.reduce_dtype])
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    # the engine leaves the root at FSDP2's default (None: keep its weights unsharded from
    # forward to backward instead of resharding and all-gathering them again)
    fully_shard(model, mesh=mesh, mp_policy=mp,
                reshard_after_forward=True if args.root_reshard == "true" else None)
    model.train()
    groups = param_groups(model, rank=r, update_proj_gap=args.gap, scale=0.25,
                          refresh=args.refresh, stagger=False)
    cls = GaLoreAdamW if opt_name == "galore_adamw" else GaLoreAdamW8bit
    opt = cls(groups, lr=1e-3)
    lw = LayerwiseOptimizer(opt) if mode == "layerwise" else None
    after_setup = proc_status("VmRSS")

    # RSS right after each FSDP group's reduce-scatter (FSDP2 runs the sharded parameters'
    # post-accumulate-grad hooks there, in both modes; this one is registered last, so in
    # per-layer mode it runs after the optimizer's hook of the group's last parameter)
    profile: list = []
    for name, last in _group_last_params(model):
        last.register_post_accumulate_grad_hook(
            lambda p, name=name: profile.append((name, proc_status("VmRSS") - baseline, proc_status("VmHWM") - baseline)))

    gen = torch.Generator().manual_seed(1000 + rank)
    steps = []
    for step in range(args.warmup + args.measure):
        x = torch.randint(0, spec["vocab_size"], (args.batch, args.seq), generator=gen)
        dist.barrier()
        rec = {"step": step, "measured": step >= args.warmup, "refresh": step % args.gap == 0}
        t0 = time.perf_counter()
        reset_peak()
        loss = model(input_ids=x, labels=x).loss
        rec["forward_peak"] = proc_status("VmHWM") - baseline
        reset_peak()
        rec["backward_start"] = proc_status("VmRSS") - baseline
        profile.clear()
        loss.backward()
        rec["backward_peak"] = proc_status("VmHWM") - baseline
        # (group, RSS, peak since backward began) after each group's reduce-scatter
        rec["backward_profile"] = list(profile)
        rec["after_backward"] = proc_status("VmRSS") - baseline
        reset_peak()
        if lw is not None:
            assert lw.step()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        rec["step_peak"] = proc_status("VmHWM") - baseline
        rec["after_step"] = proc_status("VmRSS") - baseline
        rec["peak"] = max(rec["forward_peak"], rec["backward_peak"], rec["step_peak"])
        rec["seconds"] = time.perf_counter() - t0
        rec["loss"] = float(loss)
        del loss
        steps.append(rec)
    dist.barrier()
    measured = [s for s in steps if s["measured"]]
    out = {"rank": rank, "baseline_rss_bytes": baseline, "setup_delta_bytes": after_setup - baseline,
           "peak_delta_bytes": max(s["peak"] for s in measured),
           "peak_phase": max(("forward", "backward", "step"),
                             key=lambda ph: max(s[ph + "_peak"] for s in measured)),
           "steps": steps, "analytic": analytic(model, opt)}
    return out


def child_main(args) -> int:
    import torch
    import torch.distributed as dist

    model_name, opt_name, mode = args.child
    res = run_rank(model_name, opt_name, mode, args)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if dist.get_rank() == 0:
        rec = {"model": model_name, "optimizer": opt_name, "mode": mode, "world": dist.get_world_size(),
               "torch": torch.__version__, "threads_per_rank": torch.get_num_threads(), "ranks": gathered}
        print("RESULT " + json.dumps(rec), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------------------- launcher
def summarize(rec: dict) -> dict:
    ranks = rec["ranks"]
    a = [r["analytic"] for r in ranks]
    worst = max(ranks, key=lambda r: r["peak_delta_bytes"])
    return {
        "peak_delta_gib_max_over_ranks": worst["peak_delta_bytes"] / GIB,
        "peak_delta_gib_per_rank": [r["peak_delta_bytes"] / GIB for r in ranks],
        "peak_phase_worst_rank": worst["peak_phase"],
        "phase_peaks_gib_max_over_ranks": {
            ph: max(max(s[ph + "_peak"] for s in r["steps"] if s["measured"]) for r in ranks) / GIB
            for ph in ("forward", "backward", "step")},
        "refresh_step_peak_gib": max(s["peak"] for r in ranks for s in r["steps"]
                                     if s["measured"] and s["refresh"]) / GIB,
        "steady_step_peak_gib": max((s["peak"] for r in ranks for s in r["steps"]
                                     if s["measured"] and not s["refresh"]), default=0) / GIB,
        # where in backward the peak was reached: the peak so far at the first decoder layer's
        # reduce-scatter (no gradient shard exists yet in either mode), and the RSS at the
        # root's (the last group: stored mode then holds every gradient shard, per-layer mode
        # only the root's)
        "peak_before_any_layer_grad_gib": max(s["backward_profile"][0][2] for r in ranks for s in r["steps"]
                                              if s["measured"]) / GIB,
        "rss_at_root_reduce_scatter_gib": max(e[1] for r in ranks for s in r["steps"] if s["measured"]
                                              for e in s["backward_profile"] if e[0] == "<root>") / GIB,
        "setup_delta_gib_max": max(r["setup_delta_bytes"] for r in ranks) / GIB,
        "after_step_rss_gib_max": max(r["steps"][-1]["after_step"] for r in ranks) / GIB,
        "param_shard_bytes_max": max(x["param_shard_bytes"] for x in a),
        "grad_shard_bytes_stored_max": max(x["grad_shard_bytes_stored"] for x in a),
        "grad_shard_bytes_layerwise_max": max(x["grad_shard_bytes_layerwise_max"] for x in a),
        "expected_saving_bytes_max": max(x["expected_saving_bytes"] for x in a),
        "optimizer_state_bytes_max": max(x["optimizer_state_bytes"] for x in a),
        "optimizer_scratch_bytes_max": max(x["optimizer_scratch_bytes"] for x in a),
        "step_seconds_measured_max": max(s["seconds"] for r in ranks for s in r["steps"] if s["measured"]),
    }


def launch(model_name: str, world: int, opt_name: str, mode: str, a, env: dict) -> dict | None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, "--child", model_name, opt_name, mode, *common_flags(a)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"{model_name} W={world} {opt_name} {mode}: FAILED (rc {proc.returncode})\n"
              f"{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def common_flags(a) -> list[str]:
    return ["--seq", str(a.seq), "--batch", str(a.batch), "--gap", str(a.gap), "--warmup", str(a.warmup),
            "--measure", str(a.measure), "--refresh", a.refresh, "--threads", str(a.threads),
            "--dtype", a.dtype, "--param-dtype", a.param_dtype, "--reduce-dtype", a.reduce_dtype,
            "--root-reshard", a.root_reshard]


def settings_of(a, env: dict) -> dict:
    return {"seq": a.seq, "micro_batch_per_rank": a.batch, "update_proj_gap": a.gap,
            "warmup_steps": a.warmup, "measured_steps": a.measure, "refresh": a.refresh,
            "refresh_mode": "owner", "weights": a.dtype, "fsdp_param_dtype": a.param_dtype,
            "fsdp_reduce_dtype": a.reduce_dtype, "reshard_after_forward_layers": True,
            "reshard_after_forward_root": {"true": True, "auto": None}[a.root_reshard],
            "clipping": None, "accumulation": 1, "threads_per_rank": a.threads,
            "env": {"OMP_NUM_THREADS": env["OMP_NUM_THREADS"], **{k: env.get(k) for k in MALLOC_ENV}}}


DEFAULT_VARIANT = {"seq": 256, "micro_batch_per_rank": 1, "weights": "bfloat16", "fsdp_param_dtype": "float32",
                   "fsdp_reduce_dtype": "float32", "reshard_after_forward_root": True,
                   "env": {"OMP_NUM_THREADS": "1", **MALLOC_ENV}}


def variant(settings: dict) -> str:
    """The settings that differ from the default run's (those that change memory), as text."""
    diff = [f"{k}={settings.get(k)}" for k, v in DEFAULT_VARIANT.items() if settings.get(k) != v]
    return ", ".join(diff) or "default"


def run_key(r: dict) -> tuple:
    return (r["model"], r["world"], r["optimizer"], r["mode"], json.dumps(r["settings"], sort_keys=True))


def table(runs: list[dict]) -> str:
    """Markdown tables for the README, one per variant: measured GiB, analytic MiB, per rank (max
    over ranks); the two last columns compare layerwise with stored mode of the same model, W,
    optimizer and settings."""
    out = []
    key = {run_key(r): r for r in runs}
    for var in dict.fromkeys(variant(r["settings"]) for r in runs):
        out += ["", f"settings: {var}", "",
                "| model | W | optimizer | mode | peak per rank (GiB) | gradient shards held at once (MiB) "
                "| optimizer state (MiB) | optimizer scratch (MiB) | RSS at root reduce-scatter (GiB) "
                "| peak saving (MiB) | saving at root reduce-scatter (MiB) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            if variant(r["settings"]) != var:
                continue
            s = r["summary"]
            held = s["grad_shard_bytes_stored_max"] if r["mode"] == "stored" else s["grad_shard_bytes_layerwise_max"]
            ref = key.get(run_key(dict(r, mode="stored")))
            saving = at_root = ""
            if r["mode"] == "layerwise" and ref is not None:
                t = ref["summary"]
                saving = f"{(t['peak_delta_gib_max_over_ranks'] - s['peak_delta_gib_max_over_ranks']) * 1024:.0f}"
                at_root = f"{(t['rss_at_root_reduce_scatter_gib'] - s['rss_at_root_reduce_scatter_gib']) * 1024:.0f}"
            out.append(f"| {r['model']} | {r['world']} | {r['optimizer']} | {r['mode']} "
                       f"| {s['peak_delta_gib_max_over_ranks']:.3f} | {held / MIB:.1f} "
                       f"| {s['optimizer_state_bytes_max'] / MIB:.1f} | {s['optimizer_scratch_bytes_max'] / MIB:.1f} "
                       f"| {s['rss_at_root_reduce_scatter_gib']:.3f} | {saving} | {at_root} |")
    return "\n".join(out[1:])


def dump(doc: dict) -> str:
    """JSON with indent 1; lists of scalars, and lists of those (the per-step profiles), on one line."""
    text = json.dumps(doc, indent=1)
    flat = lambda m: "[" + re.sub(r"\n\s*", " ", m.group(1)) + "]"  # noqa: E731
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", flat, text)
    return re.sub(r"\[\s+((?:\[[^\[\]{}\n]*\]|[^\[\]{}])*?)\s+\]", flat, text)


def _order(r: dict) -> tuple:
    models = list(MODELS)
    return (variant(r["settings"]) != "default", variant(r["settings"]), models.index(r["model"]), r["world"],
            OPTIMIZERS.index(r["optimizer"]), MODES.index(r["mode"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["60m", "130m"], choices=list(MODELS))
    p.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="micro-batch per rank")
    p.add_argument("--gap", type=int, default=2, help="update_proj_gap")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps (step 0: the first refresh)")
    p.add_argument("--measure", type=int, default=2,
                   help="measured steps (steps warmup.. ; those divisible by --gap refresh)")
    p.add_argument("--refresh", default="randomized", choices=("svd", "randomized"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--dtype", default="bfloat16", help="model weights (shards, gradients)")
    p.add_argument("--param-dtype", default="float32", help="FSDP2 MixedPrecisionPolicy.param_dtype")
    p.add_argument("--reduce-dtype", default="float32", help="FSDP2 MixedPrecisionPolicy.reduce_dtype")
    p.add_argument("--root-reshard", choices=("true", "auto"), default="auto",
                   help="reshard_after_forward of the root: auto (FSDP2's default, as the engine) or true")
    p.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                   help="pinned: the MALLOC_* settings of the docstring; default: glibc's own")
    p.add_argument("--mmap-threshold", type=int, default=int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]),
                   help="MALLOC_MMAP_THRESHOLD_ with --malloc pinned (bytes)")
    p.add_argument("--quick", action="store_true", help="tiny model, W=2, galore_adamw, both modes (< 1 min)")
    p.add_argument("--out", default=None)
    p.add_argument("--fresh", action="store_true", help="replace the output file instead of merging into it")
    p.add_argument("--table", action="store_true", help="print the stored results as markdown tables")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "OPTIMIZER", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child_main(a)
    if a.quick:
        a.models, a.worlds, a.optimizers, a.seq = ["tiny"], [2], ["galore_adamw"], 64
    default_out = (Path(tempfile.gettempdir()) / "fsdp_memory_quick.json" if a.quick
                   else ROOT / "benchmarks" / "results" / "fsdp_memory.json")
    out = Path(a.out) if a.out else default_out
    old = json.loads(out.read_text()) if out.exists() and not a.fresh else {}
    old_runs = [r for r in old.get("runs", []) if "settings" in r]   # (files of an older layout: dropped)
    if a.table:
        print(table(old_runs))
        return 0
    env = os.environ.copy()
    env["OMP_NUM_THREADS"] = str(a.threads)
    for k in MALLOC_ENV:
        env.pop(k, None)
    if a.malloc == "pinned":
        env.update(MALLOC_ENV, MALLOC_MMAP_THRESHOLD_=str(a.mmap_threshold))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    command = " ".join(shlex.quote(x) for x in ["python", "benchmarks/fsdp_memory.py", *sys.argv[1:]])
    settings = settings_of(a, env)
    t_all = time.time()
    runs = []
    for m in a.models:
        for w in a.worlds:
            for o in a.optimizers:
                for mode in a.modes:
                    t0 = time.time()
                    rec = launch(m, w, o, mode, a, env)
                    if rec is None:
                        continue
                    rec["wall_s"] = time.time() - t0
                    rec["settings"] = settings
                    rec["command"] = command
                    rec["summary"] = summarize(rec)
                    runs.append(rec)
                    s = rec["summary"]
                    print(f"{m:>5} W={w} {o:<16} {mode:<9} peak/rank {s['peak_delta_gib_max_over_ranks']:.3f} GiB "
                          f"({s['peak_phase_worst_rank']}; fwd {s['phase_peaks_gib_max_over_ranks']['forward']:.3f} "
                          f"bwd {s['phase_peaks_gib_max_over_ranks']['backward']:.3f} "
                          f"step {s['phase_peaks_gib_max_over_ranks']['step']:.3f}) "
                          f"grads {s['grad_shard_bytes_stored_max'] / MIB:.1f} MiB "
                          f"state {s['optimizer_state_bytes_max'] / MIB:.1f} MiB  {rec['wall_s']:.0f}s", flush=True)
    wall = time.time() - t_all
    new_keys = {run_key(r) for r in runs}
    merged = sorted([r for r in old_runs if run_key(r) not in new_keys] + runs, key=_order)
    commands = [c for c in old.get("commands", []) if c["command"] != command or c["settings"] != settings]
    commands.append({"command": command, "wall_s": wall, "settings": settings,
                     "rank_command": "torchrun --standalone --nproc_per_node W benchmarks/fsdp_memory.py "
                                     "--child MODEL OPTIMIZER MODE " + " ".join(common_flags(a))})
    doc = {
        "benchmark": "benchmarks/fsdp_memory.py",
        "host": platform.node(), "cpus": os.cpu_count(), "device": "cpu/gloo",
        "torch": runs[0]["torch"] if runs else old.get("torch"),
        "ranks": {m: MODELS[m]["rank"] for m in MODELS},
        "note": "peak = max over the measured steps of Linux VmHWM (reset before forward, backward and "
                "optimizer step) minus the rank's RSS before the model; analytic bytes are exact per rank; "
                "each run carries its settings and command (the file merges invocations: a run replaces "
                "the stored one with the same model, W, optimizer, mode and settings)",
        "commands": commands,
        "runs": merged,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump(doc))
    print(table(runs))
    print(f"wrote {out} ({wall:.0f}s)")
    return 0 if runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
