"""One validated schema for the JSON recipe.

A recipe is a JSON object with the sections below; every key has a default, so a recipe only
states what differs. `--set section.key=value` overrides one key (value parsed as JSON, else
taken as a string). Validation runs before any heavy import (this module imports only the
standard library and galore_ds.core.settings, the GaLore defaults, which imports nothing else)
and every problem raises ConfigError("<key>: <problem>; <fix>").

Sections: model, data, training, galore, engine (with engine.deepspeed passed to DeepSpeed
as-is and engine.fsdp), checkpoint, logging. Keys starting with "_" are comments.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from galore_ds.core.settings import DEFAULTS as GALORE, MOMENT_POLICIES  # standard library only, like this module

BUILTIN_SOURCE = "python-stdlib"   # the embedded default corpus (no download)
HF_PREFIX = "hf:"                  # data.source "hf:<dataset name>" streams a Hugging Face dataset
ENGINE_MODES = ("auto", "single", "layerwise", "deepspeed", "fsdp", "ddp")
MULTI_RANK_ENGINES = ("deepspeed", "fsdp", "ddp", "layerwise")
OPTIMIZERS = ("galore_adamw", "galore_adamw8bit", "galore_adafactor", "fira_adamw", "apollo_adamw", "apollo_mini",
              "adamw")
# the rules that read each matrix's full gradient (Fira, APOLLO): the ddp engine, which averages
# only projected gradients, cannot carry them
FULL_GRADIENT_OPTIMIZERS = ("fira_adamw", "apollo_adamw", "apollo_mini")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A recipe problem; str(e) is the single line shown to the user: '<key>: <problem>; <fix>'."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}; {fix}")


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """LLaMA dimensions (Hugging Face LlamaConfig names)."""
    hidden_size: int = 512            # defaults: the paper's 60M LLaMA
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None   # None = num_attention_heads (no GQA)
    vocab_size: int = 32000
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"                      # parameter dtype: float32 | bfloat16 | float16
    meta_init: Optional[bool] = None            # build on the meta device; None = auto (>= 1B params)
    # Recompute each decoder layer in backward (transformers' gradient checkpointing,
    # non-reentrant): only the layers' inputs stay saved, for one more forward's compute.
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    """Where tokens come from and how they are cut."""
    source: str = BUILTIN_SOURCE   # python-stdlib | file or directory (.txt/.jsonl/.parquet) | hf:<name>
    eval_source: Optional[str] = None  # same forms; None = hold out eval_fraction of source's documents
    eval_fraction: float = 0.02
    hf_split: str = "train"
    hf_eval_split: str = "validation"
    hf_config: Optional[str] = None
    text_field: str = "text"       # jsonl / parquet / hf column holding the text
    tokenizer: str = "bpe"         # "bpe" = local byte-level BPE trained once and cached | HF name or path
    seq_len: int = 256
    max_chars: int = 0             # 0 = all; else stop reading the source after this many characters
    cache_dir: str = ".cache/galore_ds"
    seed: int = 0                  # shuffling of packed sequences (per epoch; in-memory data only)
    # Stream documents -> tokens -> rows while training instead of packing the corpus in memory
    # (C4 does not fit). None = true for hf: sources, false otherwise. Streamed data keeps the
    # source's order (no shuffle) and needs a pretrained data.tokenizer (not "bpe").
    streaming: Optional[bool] = None

    @property
    def streamed(self) -> bool:
        """Whether this recipe uses the streaming loader (data.streaming, resolved)."""
        return self.source.startswith(HF_PREFIX) if self.streaming is None else self.streaming


@dataclass
class TrainingConfig:
    optimizer: str = "galore_adamw"   # galore_adamw | galore_adamw8bit | galore_adafactor | fira_adamw |
                                      # apollo_adamw | apollo_mini | adamw (docs/family.md)
    steps: int = 100                  # optimizer steps
    lr: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1         # cosine decays to min_lr_ratio * lr (paper: 10%)
    global_batch: int = 512           # sequences per optimizer step, all ranks together
    micro_batch: int = 32             # sequences per forward/backward per rank
    grad_clip: float = 0.0            # max global grad norm; 0 = off
    clip_timing: str = "exact"        # exact | delayed (the previous step's norm: the per-layer 24 GB mode)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    seed: int = 0
    eval_every: int = 0               # optimizer steps between evaluations; 0 = only at the end
    eval_batches: int = 8             # micro-batches per evaluation


@dataclass
class GaloreConfig:
    """The recipe's `galore` section: GaLoreSettings' options with its defaults
    (galore_ds/core/settings.py, the one place they are written), plus `enabled`."""
    enabled: bool = True              # False: every matrix full-rank (the AdamW baseline)
    rank: int = GALORE.rank
    update_proj_gap: int = GALORE.update_proj_gap
    scale: float = GALORE.scale
    proj_type: str = GALORE.proj_type            # std | left | right | reverse_std
    target_modules: list = field(default_factory=lambda: list(GALORE.target_modules))
    refresh: str = GALORE.refresh                # svd (exact) | randomized (warm subspace iteration)
    signs: str = GALORE.signs                    # aligned | lapack
    moments: str = GALORE.moments                # keep | reproject | reset
    stagger: bool = GALORE.stagger
    oversample: int = GALORE.oversample
    power_iters: int = GALORE.power_iters
    first_power_iters: int = GALORE.first_power_iters
    seed: int = GALORE.seed


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = True  # decoder layers; the root keeps FSDP2's default
    param_dtype: str = "float32"
    reduce_dtype: str = "float32"
    replicate: int = 1                # HSDP: replicas (1 = plain FSDP)
    layerwise: bool = False           # per-layer updates inside backward (galore_ds.LayerwiseOptimizer on the FSDP2 shards)


@dataclass
class DDPConfig:
    layerwise: bool = False           # per-layer updates inside backward (the 24 GB mode on every rank)
    bucket_mb: float = 25.0           # projected gradients are averaged in buckets of this size
    # what the averaged gradients travel as. "float32": exact to rounding. "bfloat16": half the
    # bytes, the sum over ranks rounded to bf16 (DDP's bf16 compression). "float64" (per-layer
    # only): gradients accumulated and averaged in fp64, so a step's sum does not depend on how
    # its micro-batches are spread over ranks (elastic resume on another world size continues
    # bit-for-bit as far as fp32 allows), at twice the bytes
    reduce_dtype: str = "float32"


@dataclass
class EngineConfig:
    mode: str = "auto"                # auto | single | layerwise | deepspeed | fsdp | ddp
    multi_rank: str = "deepspeed"     # what auto uses with several ranks
    deepspeed: dict = field(default_factory=dict)   # passed to deepspeed.initialize(config=...)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)


@dataclass
class CheckpointConfig:
    every: int = 0                    # optimizer steps between checkpoints; 0 = only at the end / Ctrl-C
    dir: Optional[str] = None         # None = <logging.run_dir>/checkpoints
    keep_last: int = 2                # older step-* directories are deleted; 0 = keep all
    resume: Optional[str] = None      # null | "latest" | path to a step-* directory
    save_final: bool = True


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_every: int = 1
    progress_bar: bool = True
    tensorboard: bool = False         # event files under <run_dir>/tensorboard (the tensorboard package)
    wandb: str = "off"                # off | offline (no network; `wandb sync` later) | online
    wandb_project: str = "galore_ds"


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ---- derived values --------------------------------------------------------------------
    def accumulation(self, world_size: int) -> int:
        return self.training.global_batch // (self.training.micro_batch * world_size)

    def resolved_mode(self, dist: "DistEnv") -> str:
        if self.engine.mode != "auto":
            return self.engine.mode
        # One rank: the 24 GB mode (per-layer updates inside backward; the full-rank AdamW
        # baseline has no per-layer mode). Several ranks: the configured multi-rank engine.
        if dist.world_size > 1:
            return self.engine.multi_rank
        return "single" if self.training.optimizer == "adamw" else "layerwise"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.logging.run_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Launcher environment (torchrun / deepspeed launcher / mpirun / plain python)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "python"


def dist_env(env: Optional[dict[str, str]] = None) -> DistEnv:
    """Read rank/world size from the launcher's environment variables (no collectives)."""
    env = os.environ if env is None else env
    for launcher, r, w, lr in (
        ("torch", "RANK", "WORLD_SIZE", "LOCAL_RANK"),                         # torchrun, deepspeed
        ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),                  # mpich / hydra
        ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ):
        if r in env and w in env:
            try:
                return DistEnv(int(env[r]), int(env[w]), int(env.get(lr, env[r])), launcher)
            except ValueError:
                raise ConfigError(r, f"environment value {env[r]!r}/{env[w]!r} is not an integer",
                                  "check the launcher") from None
    return DistEnv()


# ----------------------------------------------------------------------------------------------
# dict -> dataclasses, with type checking
# ----------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            list: "a list", dict: "an object"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected an object (section), got {json.dumps(value)}",
                              f"write \"{key.rsplit('.', 1)[-1]}\": {{...}}")
        return _build(tp, value, key + ".")
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[tp](value)
    if not ok:
        raise ConfigError(key, f"expected {_type_name(tp)}, got {json.dumps(value)}",
                          f"set {key} to {_type_name(tp)}")
    return float(value) if tp is float else value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key.startswith("_"):
            continue  # comment
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])] or sorted(names)
            raise ConfigError(prefix + key, "unknown key",
                              f"remove it or use one of {', '.join(prefix + n for n in sorted(close))}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def from_dict(data: Any) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("<recipe>", "the recipe must be a JSON object", "write {\"model\": {...}, ...}")
    return _build(Config, data)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings: --set data.source=/path/to/x


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to the raw recipe dict (checked against the schema)."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", f"{item!r} is not key=value", "write --set training.lr=0.01")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        # walk the schema, so an unknown key is reported as such even if the recipe lacks it
        cls: Any = Config
        node = data
        for i, part in enumerate(parts):
            key = ".".join(parts[: i + 1])
            free_form = cls is dict  # inside engine.deepspeed: any key goes to DeepSpeed
            if not free_form:
                fields = {f.name for f in dataclasses.fields(cls)}
                if part not in fields:
                    raise ConfigError(key, "unknown key in --set",
                                      f"use one of {', '.join(sorted(('.'.join(parts[:i]) + '.' if i else '') + f for f in fields))}")
                tp = typing.get_type_hints(cls)[part]
            else:
                tp = dict
            last = i == len(parts) - 1
            if last:
                node[part] = _parse_value(text)
            else:
                if not free_form and not (dataclasses.is_dataclass(tp) or tp is dict):
                    raise ConfigError(key, "is not a section", f"use --set {key}=value")
                nxt = node.setdefault(part, {})
                if not isinstance(nxt, dict):
                    raise ConfigError(key, "is not a section", f"use --set {key}=value")
                node = nxt
                cls = tp if not free_form else dict
    return data


def load_json(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"{p} does not exist", "pass the path of a recipe, e.g. configs/tiny.json")
    text = p.read_text()
    if not text.strip():
        raise ConfigError("--config", f"{p} is empty", "write a JSON object, e.g. {\"model\": {...}}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("--config", f"{p} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                          "fix the JSON syntax") from None
    return data


# ----------------------------------------------------------------------------------------------
# Semantic checks
# ----------------------------------------------------------------------------------------------
WANDB_MODES = ("off", "offline", "online")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {list(choices)}", f"set {key} to one of {list(choices)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}",
                          f"set {key} to a {'non-negative' if allow_zero else 'positive'} value")


def _source_exists(key: str, source: Optional[str], max_chars: int, streamed: bool) -> None:
    import importlib.util

    if source is None or source == BUILTIN_SOURCE:
        return
    if source.startswith(HF_PREFIX):
        if importlib.util.find_spec("datasets") is None:
            raise ConfigError(key, f"{source!r} needs the `datasets` package, which is not installed",
                              "pip install -e .[data] (or datasets), or use local files")
        if max_chars <= 0 and not streamed:  # the in-memory packer must stop somewhere
            raise ConfigError("data.max_chars", "must be > 0 with an hf: source and data.streaming=false "
                              "(the in-memory packer reads that many characters)",
                              "set data.max_chars, e.g. 2000000000, or data.streaming=true")
        return
    if source.endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
        raise ConfigError(key, "parquet files need the `pyarrow` package, which is not installed",
                          "pip install -e .[data] (or pyarrow), or convert to .jsonl")
    if not Path(source).exists():
        raise ConfigError(key, f"path {source!r} does not exist",
                          f"point {key} at a .txt/.jsonl/.parquet file or directory, "
                          f"or use {BUILTIN_SOURCE!r} or 'hf:<dataset>'")


def smallest_galore_dim(m: ModelConfig, targets: list) -> int:
    """Smallest dimension among the matrices GaLore targets (LLaMA module names)."""
    head_dim = m.hidden_size // m.num_attention_heads
    kv = (m.num_key_value_heads or m.num_attention_heads) * head_dim
    dims = []
    if any(t in "self_attn.q_proj self_attn.k_proj self_attn.v_proj self_attn.o_proj" for t in targets):
        dims.append(min(m.hidden_size, kv))
    if any(t in "mlp.gate_proj mlp.up_proj mlp.down_proj" for t in targets):
        dims.append(min(m.hidden_size, m.intermediate_size))
    return min(dims) if dims else 0


def validate(cfg: Config, dist: Optional[DistEnv] = None) -> Config:
    """Semantic checks; raises ConfigError naming the key and the fix. Returns cfg."""
    dist = dist or dist_env()
    m, d, t, g, e, c, lg = cfg.model, cfg.data, cfg.training, cfg.galore, cfg.engine, cfg.checkpoint, cfg.logging

    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size", "max_position_embeddings"):
        _positive(f"model.{key}", getattr(m, key))
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.num_attention_heads",
                          f"{m.num_attention_heads} does not divide model.hidden_size={m.hidden_size}",
                          "choose heads so hidden_size % heads == 0")
    if m.num_key_value_heads is not None and (m.num_key_value_heads <= 0 or m.num_attention_heads % m.num_key_value_heads):
        raise ConfigError("model.num_key_value_heads",
                          f"{m.num_key_value_heads} does not divide num_attention_heads={m.num_attention_heads}",
                          "use a divisor of num_attention_heads, or null")
    _choice("model.dtype", m.dtype, DTYPES)
    _positive("model.init_std", m.init_std)

    _source_exists("data.source", d.source, d.max_chars, d.streamed)
    _source_exists("data.eval_source", d.eval_source, d.max_chars, d.streamed)
    if d.streamed and d.tokenizer == "bpe":
        # the local BPE trains on the whole corpus before the first token; a stream has no "whole"
        raise ConfigError("data.tokenizer", "'bpe' is trained on the whole corpus up front, which a streamed "
                          "source (data.streaming) does not have",
                          "set data.tokenizer to a Hugging Face tokenizer name or path (e.g. t5-base), "
                          "or data.streaming=false with data.max_chars > 0")
    _positive("data.seq_len", d.seq_len)
    if d.seq_len > m.max_position_embeddings:
        raise ConfigError("data.seq_len", f"{d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}",
                          "lower data.seq_len or raise model.max_position_embeddings")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError("data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}", "use e.g. 0.02")
    if d.eval_source is None and d.eval_fraction == 0 and t.eval_batches > 0 and not d.streamed:
        raise ConfigError("data.eval_fraction", "is 0 and no data.eval_source is set, so there is nothing to evaluate on",
                          "set data.eval_fraction > 0, data.eval_source, or training.eval_batches=0")
    _positive("data.max_chars", d.max_chars, allow_zero=True)
    if d.tokenizer == "bpe" and m.vocab_size < 260:
        raise ConfigError("model.vocab_size", f"{m.vocab_size} is too small for the byte-level BPE (256 bytes + specials)",
                          "use model.vocab_size >= 260")

    _choice("training.optimizer", t.optimizer, OPTIMIZERS)
    _positive("training.steps", t.steps)
    _positive("training.lr", t.lr, allow_zero=True)
    _positive("training.warmup_steps", t.warmup_steps, allow_zero=True)
    if t.warmup_steps > t.steps:
        raise ConfigError("training.warmup_steps", f"{t.warmup_steps} exceeds training.steps={t.steps}",
                          "use warmup_steps <= steps (paper: 10% of steps)")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError("training.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}", "use 0.1 (paper)")
    _positive("training.global_batch", t.global_batch)
    _positive("training.micro_batch", t.micro_batch)
    per_step = t.micro_batch * dist.world_size
    if t.global_batch % per_step:
        raise ConfigError("training.global_batch",
                          f"{t.global_batch} is not divisible by micro_batch*world_size = {t.micro_batch}*{dist.world_size}",
                          f"use a multiple of {per_step}, or change training.micro_batch")
    _positive("training.grad_clip", t.grad_clip, allow_zero=True)
    _choice("training.clip_timing", t.clip_timing, ("exact", "delayed"))
    _positive("training.weight_decay", t.weight_decay, allow_zero=True)
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise ConfigError(f"training.{key}", f"must be in [0, 1), got {getattr(t, key)}", "use 0.9 / 0.999")
    _positive("training.eps", t.eps)
    _positive("training.eval_every", t.eval_every, allow_zero=True)
    _positive("training.eval_batches", t.eval_batches, allow_zero=True)

    if g.enabled or t.optimizer.startswith("galore"):
        if g.rank <= 0:
            raise ConfigError("galore.rank", f"must be > 0, got {g.rank}", "use e.g. 128 (60M) or 256 (130M/350M)")
        if not g.target_modules or not all(isinstance(x, str) and x for x in g.target_modules):
            raise ConfigError("galore.target_modules", f"must be a non-empty list of names, got {g.target_modules}",
                              "use [\"attn\", \"mlp\"]")
        smallest = smallest_galore_dim(m, g.target_modules)
        if smallest == 0:
            raise ConfigError("galore.target_modules", f"{g.target_modules} matches no LLaMA attention/MLP matrix",
                              "use names from self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, e.g. [\"attn\", \"mlp\"]")
        if g.rank > smallest:
            raise ConfigError("galore.rank", f"{g.rank} exceeds the smallest GaLore matrix dimension {smallest}",
                              f"use galore.rank <= {smallest} or a larger model")
        if g.update_proj_gap < 1:
            raise ConfigError("galore.update_proj_gap", f"must be >= 1, got {g.update_proj_gap}", "use e.g. 200 (paper)")
        _positive("galore.scale", g.scale)
        _choice("galore.proj_type", g.proj_type, ("std", "reverse_std", "left", "right"))
        _choice("galore.refresh", g.refresh, ("svd", "randomized"))
        _choice("galore.signs", g.signs, ("aligned", "lapack"))
        moments = MOMENT_POLICIES if t.optimizer in ("galore_adamw", "fira_adamw") else ("keep", "reset")
        _choice("galore.moments", g.moments, moments)
        for key in ("oversample", "power_iters", "first_power_iters"):
            _positive(f"galore.{key}", getattr(g, key), allow_zero=key == "oversample")
    if t.optimizer == "adamw" and g.enabled:
        raise ConfigError("galore.enabled", "training.optimizer=adamw is full-rank but galore.enabled is true",
                          "set galore.enabled=false (AdamW baseline) or a galore_* optimizer")

    _choice("engine.mode", e.mode, ENGINE_MODES)
    _choice("engine.multi_rank", e.multi_rank, MULTI_RANK_ENGINES)
    mode = cfg.resolved_mode(dist)
    if mode in ("single", "layerwise") and dist.world_size > 1:
        key = "engine.mode" if e.mode != "auto" else "engine.multi_rank"
        raise ConfigError(key, f"{mode!r} runs one process but the launcher started {dist.world_size}",
                          "use engine.mode=auto/deepspeed/fsdp/ddp, or launch one process")
    if mode == "layerwise" and t.optimizer == "adamw":
        raise ConfigError("training.optimizer", "adamw has no per-layer mode (engine.mode=layerwise)",
                          "use galore_adamw/galore_adamw8bit/galore_adafactor (galore.enabled=false gives "
                          "their full-rank rule), or engine.mode=single")
    fp16 = e.deepspeed.get("fp16", {})
    stage = e.deepspeed.get("zero_optimization", {}).get("stage", 0)
    if isinstance(fp16, dict) and fp16.get("enabled") and stage == 0:
        # engine.backward skips the loss scaling that FP16_UnfusedOptimizer.step undoes
        raise ConfigError("engine.deepspeed.fp16",
                          "DeepSpeed 0.19.8 at ZeRO stage 0 never scales an fp16 loss but divides "
                          "every gradient by the loss scale (DeepSpeed PR #8393)",
                          "use \"bf16\": {\"enabled\": true}, or zero_optimization.stage >= 1")
    _choice("engine.fsdp.param_dtype", e.fsdp.param_dtype, DTYPES)
    _choice("engine.fsdp.reduce_dtype", e.fsdp.reduce_dtype, DTYPES)
    _positive("engine.fsdp.replicate", e.fsdp.replicate)
    if mode == "fsdp" and dist.world_size % e.fsdp.replicate:
        raise ConfigError("engine.fsdp.replicate", f"{e.fsdp.replicate} does not divide the {dist.world_size} ranks",
                          "use a divisor of the world size (HSDP replicas x shards = ranks)")
    if mode == "ddp" and t.optimizer in FULL_GRADIENT_OPTIMIZERS:
        raise ConfigError("engine.mode", f"ddp averages only projected gradients; {t.optimizer} reads each matrix's "
                          "full gradient", "use engine.mode=deepspeed (ZeRO stage 0 is plain data parallelism) or fsdp, "
                          "or a galore_* optimizer")
    if mode == "ddp" and t.optimizer == "adamw":
        raise ConfigError("engine.mode", "ddp averages GaLore's projected gradients; training.optimizer=adamw has none",
                          "use a galore_* optimizer (galore.enabled=false gives their full-rank rule), or "
                          "engine.mode=fsdp/deepspeed for the AdamW baseline")
    _positive("engine.ddp.bucket_mb", e.ddp.bucket_mb)
    _choice("engine.ddp.reduce_dtype", e.ddp.reduce_dtype, ("float32", "float64", "bfloat16"))
    if e.ddp.reduce_dtype == "float64" and not e.ddp.layerwise:
        raise ConfigError("engine.ddp.reduce_dtype", "float64 accumulation needs the per-layer hooks",
                          "set engine.ddp.layerwise=true, or keep reduce_dtype=float32")
    if e.fsdp.layerwise and t.optimizer == "adamw":
        raise ConfigError("engine.fsdp.layerwise", "training.optimizer=adamw has no per-layer mode",
                          "use galore_adamw or galore_adamw8bit (galore.enabled=false gives their full-rank rule)")

    _positive("checkpoint.every", c.every, allow_zero=True)
    _positive("checkpoint.keep_last", c.keep_last, allow_zero=True)
    if c.resume not in (None, "latest") and not Path(c.resume).is_dir():
        raise ConfigError("checkpoint.resume", f"{c.resume!r} is not a checkpoint directory",
                          "use \"latest\", null, or a <checkpoint.dir>/step-* path")
    _positive("logging.log_every", lg.log_every)
    _choice("logging.wandb", lg.wandb, WANDB_MODES)
    for key, on, package in (("logging.tensorboard", lg.tensorboard, "tensorboard"),
                             ("logging.wandb", lg.wandb != "off", "wandb")):
        if on and importlib.util.find_spec(package) is None:
            raise ConfigError(key, f"needs the {package} package, which is not installed",
                              f"pip install {package} (or 'galore_ds[train]'), or switch {key} off")
    if not lg.run_dir:
        raise ConfigError("logging.run_dir", "is empty", "set a directory, e.g. runs/tiny")
    return cfg


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None,
                dist: Optional[DistEnv] = None) -> Config:
    """Read, override, build and validate a recipe. Raises ConfigError."""
    data = apply_overrides(load_json(path), overrides or [])
    return validate(from_dict(data), dist)


__all__ = ["Config", "ConfigError", "DistEnv", "dist_env", "from_dict", "apply_overrides", "load_json",
           "load_config", "validate", "ModelConfig", "DataConfig", "TrainingConfig", "GaloreConfig",
           "EngineConfig", "FSDPConfig", "DDPConfig", "CheckpointConfig", "LoggingConfig"]
