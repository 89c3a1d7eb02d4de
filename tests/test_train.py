"""The train loop and the single engine: loss falls, resume is bit-identical, the schedule
counts optimizer steps, accumulation is exact, checkpoints are atomic and loadable with
weights_only=True, Ctrl-C saves, metrics and plots come out."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from galore_ds.train.config import DistEnv
from galore_ds.train.data import StepLoader, build_datasets
from galore_ds.train.model import build_model
from galore_ds.train import checkpoint
from galore_ds.train.engines.base import EngineUnavailable, engine_class
from galore_ds.train.engines.single import SingleEngine
from galore_ds.train.scheduler import lr_factor
from galore_ds.train.trainer import train
from recipes import flat, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # tokenizer + tokens shared by this module's runs


def make_cfg(tmp_path, cache_dir, **over):
    # the single engine unless a test says otherwise (one rank's auto default, the per-layer
    # engine, has its own tests in test_layerwise_engine.py and the resume test below)
    return tiny_cfg(tmp_path, cache_dir, **{"engine__mode": "single", **over})


def stop_after(base: type = SingleEngine, at: int = 3) -> type:
    """`base` that presses Ctrl-C (SIGINT to this process) during optimizer step `at`."""
    class StopAfter(base):
        def train_step(self, micro_batches):
            out = super().train_step(micro_batches)
            if self.scheduler.last_epoch == at:
                os.kill(os.getpid(), signal.SIGINT)
            return out
    return StopAfter


def weights(path: Path) -> dict:
    return torch.load(path / "engine.pt", weights_only=True)  # weights_only: no pickled objects


def test_loss_falls_on_tiny_data(tmp_path, cache_dir):
    cfg = make_cfg(tmp_path, cache_dir, training__steps=30, training__warmup_steps=3)
    out = train(cfg, DistEnv())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 0.8, losses  # ln(400) = 6.0 -> clearly lower
    assert out["eval_loss"] < losses[0] - 0.5
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in rows if "loss" in r)


@pytest.mark.parametrize("mode", ["single", "layerwise"])
@pytest.mark.parametrize("optimizer", ["galore_adamw", "galore_adamw8bit"])
def test_resume_continues_bit_identically(tmp_path, cache_dir, optimizer, mode):
    # 6 straight steps vs 3 + save + fresh process state + 3: same weights and optimizer state,
    # with refreshes (update_proj_gap=2) on both sides of the resume point.
    a = make_cfg(tmp_path / "a", cache_dir, training__optimizer=optimizer, engine__mode=mode)
    train(a, DistEnv())
    b = make_cfg(tmp_path / "b", cache_dir, training__optimizer=optimizer, engine__mode=mode)
    stopping = stop_after(engine_class(mode))(b, DistEnv())
    assert train(b, DistEnv(), stopping)["step"] == 3  # same recipe, stopped at 3
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    b = make_cfg(tmp_path / "b", cache_dir, training__optimizer=optimizer, checkpoint__resume="latest",
                 engine__mode=mode)
    out = train(b, DistEnv())
    assert out["step"] == 6
    wa = weights(tmp_path / "a" / "ckpt" / "step-0000006")
    wb = weights(tmp_path / "b" / "ckpt" / "step-0000006")
    ta, tb = list(flat(wa)), list(flat(wb))
    assert len(ta) == len(tb) > 0
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))
    sched = wb["scheduler"] if mode == "single" else wb["layerwise"]["lr_scheduler"]
    assert sched["last_epoch"] == 6
    ma = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    mb = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]  # resumed run appended its steps 4..6


def test_scheduler_steps_once_per_optimizer_step_with_accumulation(tmp_path, cache_dir):
    cfg = make_cfg(tmp_path, cache_dir, training__steps=5, training__warmup_steps=2, training__micro_batch=2)
    assert cfg.accumulation(1) == 4
    train(cfg, DistEnv())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    expected = [0.01 * lr_factor(s, 2, 5, 0.1) for s in range(5)]
    assert [r["lr"] for r in rows] == pytest.approx(expected)
    assert expected[-1] > 0.01 * 0.1 and expected[1] == pytest.approx(0.01)  # warmup ends at step 2
    sd = weights(tmp_path / "ckpt" / "step-0000005")
    assert sd["scheduler"]["last_epoch"] == 5


def test_schedule_is_warmup_then_cosine_to_ten_percent():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_accumulated_step_equals_one_big_batch(tmp_path, cache_dir):
    # Same 8 sequences as 1 x 8 or 4 x 2 micro-batches: same grad norm and same update.
    cfg1 = make_cfg(tmp_path, cache_dir, training__micro_batch=8, galore__update_proj_gap=1)
    cfg4 = make_cfg(tmp_path, cache_dir, training__micro_batch=2, galore__update_proj_gap=1)
    _, ds, _ = build_datasets(cfg1.data, cfg1.model.vocab_size)
    batch = StepLoader(ds, 8, 8, 0, 1).next_step()[0]
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    results = []
    for cfg, mbs in ((cfg1, [batch]), (cfg4, micro)):
        e = SingleEngine(cfg, DistEnv())
        e.setup(build_model(cfg.model, seed=0))
        out = e.train_step(mbs)
        results.append((out, [p.detach().clone() for p in e.model.parameters()]))
    (o1, p1), (o4, p4) = results
    assert o1.loss == pytest.approx(o4.loss, rel=1e-5)
    assert o1.grad_norm == pytest.approx(o4.grad_norm, rel=1e-4)
    assert max((a - b).abs().max().item() for a, b in zip(p1, p4)) < 1e-5


def test_clipping_bounds_the_update(tmp_path, cache_dir):
    cfg = make_cfg(tmp_path, cache_dir, training__grad_clip=1e-3, galore__enabled=False, training__optimizer="adamw")
    e = SingleEngine(cfg, DistEnv())
    e.setup(build_model(cfg.model, seed=0))
    _, ds, _ = build_datasets(cfg.data, cfg.model.vocab_size)
    out = e.train_step(StepLoader(ds, 8, 4, 0, 1).next_step())
    total = math.sqrt(sum(p.grad.pow(2).sum().item() for p in e.model.parameters() if p.grad is not None))
    assert out.grad_norm > 1e-2 and total == pytest.approx(1e-3, rel=1e-3)  # logged: pre-clip; applied: clipped


def test_checkpoint_is_atomic_loadable_and_pruned(tmp_path, cache_dir):
    cfg = make_cfg(tmp_path, cache_dir, checkpoint__every=2, checkpoint__keep_last=2)
    train(cfg, DistEnv())
    root = tmp_path / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004", "step-0000006"]  # no .tmp left
    assert checkpoint.resolve(root, "latest") == root / "step-0000006"
    d = root / "step-0000006"
    for f in d.iterdir():
        torch.load(f, weights_only=True)
    st = torch.load(d / "trainer.pt", weights_only=True)
    assert st["step"] == 6 and st["data"]["position"] == 6 * 8
    assert any("exp_avg" in s for s in weights(d)["optimizer"]["state"].values())


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path, cache_dir):
    cfg = make_cfg(tmp_path, cache_dir, training__steps=50, checkpoint__save_final=False)
    out = train(cfg, DistEnv(), stop_after(at=2)(cfg, DistEnv()))
    assert out["interrupted"] and out["step"] == 2
    assert checkpoint.resolve(tmp_path / "ckpt", "latest").name == "step-0000002"


def test_metrics_and_plot(tmp_path, cache_dir):
    cfg = make_cfg(tmp_path, cache_dir, training__eval_every=3)
    train(cfg, DistEnv())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in rows if "loss" in r]
    ev = [r for r in rows if "eval_loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mem_gb", "refreshes"):
        assert key in tr[0]
    assert [r["step"] for r in ev] == [3, 6] and ev[0]["eval_ppl"] == pytest.approx(math.exp(ev[0]["eval_loss"]))
    from galore_ds.tools.plot import main

    png = tmp_path / "loss.png"
    assert main([str(tmp_path / "run" / "metrics.jsonl"), "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_and_offline_wandb_get_the_metrics_and_a_resume_continues_them(tmp_path, cache_dir,
                                                                                    monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    over = dict(training__steps=6, training__eval_every=3, checkpoint__every=2, logging__tensorboard=True,
                logging__wandb="offline", logging__progress_bar=False)
    train(make_cfg(tmp_path, cache_dir, **{**over, "training__steps": 4}), DistEnv())
    # resume from step 2: steps 3 and 4 run again, and TensorBoard must hold them once (purged)
    train(make_cfg(tmp_path, cache_dir, **over, checkpoint__resume=str(tmp_path / "ckpt" / "step-0000002")),
          DistEnv())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the last logged loss of each step (the resumed run's for 3-6): what TensorBoard must hold
    want = {r["step"]: r["loss"] for r in rows if "loss" in r}
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    got = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert all(abs(got[s] - want[s]) < 1e-5 * abs(want[s]) for s in got)
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [3, 6]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "run" / "wandb_id").read_text()
    assert runs and all(r.name.endswith(run_id) for r in runs)  # the resumed run continues the same W&B run
    assert all(any(r.glob("*.wandb")) for r in runs)


def test_logging_sinks_name_the_missing_package(tmp_path, cache_dir, monkeypatch):
    import importlib.util

    from galore_ds.train.config import ConfigError, validate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="logging.wandb.*pip install wandb"):
        validate(make_cfg(tmp_path, cache_dir, logging__wandb="offline"), DistEnv())


def test_meta_built_model_matches_cpu_built(tmp_path, cache_dir):
    from galore_ds.train.model import materialize

    m = make_cfg(tmp_path, cache_dir).model
    a = build_model(m, seed=5, meta=False)
    b = build_model(m, seed=5, meta=True)
    assert all(p.is_meta for p in b.parameters())
    materialize(b, "cpu", m.init_std, seed=5)
    x = torch.randint(0, 400, (2, 16))
    assert torch.equal(a(input_ids=x, labels=x).loss, b(input_ids=x, labels=x).loss)


def test_activation_checkpointing_recomputes_each_layer_and_changes_no_gradient(tmp_path, cache_dir):
    import dataclasses

    m = make_cfg(tmp_path, cache_dir, model__dtype="bfloat16").model
    x = torch.randint(0, 400, (2, 32))
    grads, calls = [], []
    for checkpointing in (False, True):
        model = build_model(dataclasses.replace(m, activation_checkpointing=checkpointing), seed=3).train()
        seen = [0]
        # a pre-hook: torch's recomputation stops (early) before the layer's last post-hooks
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: seen.__setitem__(0, seen[0] + 1))
        model(input_ids=x, labels=x).loss.backward()
        calls.append(seen[0])
        grads.append([p.grad for p in model.parameters()])
    assert calls == [1, 2]  # checkpointed: the layer ran again inside backward
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_large_model_is_built_without_fp32_materialisation():
    from galore_ds.train.config import ModelConfig

    m = ModelConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    dtype="bfloat16")
    model = build_model(m)  # 6.7B parameters: would need 27 GB in fp32
    p = next(model.parameters())
    assert p.is_meta and p.dtype == torch.bfloat16


def test_unlanded_engine_is_reported_not_crashed(tmp_path, monkeypatch):
    from galore_ds.train.engines import base as eng

    monkeypatch.setitem(eng.ENGINES, "future", "galore_ds.train.engines.future:FutureEngine")
    with pytest.raises(EngineUnavailable, match="not available"):
        engine_class("future")
    assert engine_class("single") is SingleEngine


def test_launcher_trains_end_to_end(tmp_path, cache_dir):
    # plain `python launch/train.py`; --resume with no checkpoint yet starts from step 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    sets = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "model.vocab_size=400",
            "data.max_chars=60000", f"data.cache_dir={cache_dir}", "data.seq_len=32", "training.global_batch=4",
            "training.micro_batch=4", "galore.rank=8", "training.warmup_steps=1", "training.steps=2",
            "training.eval_every=0", "training.eval_batches=1", f"logging.run_dir={tmp_path}/run",
            "logging.progress_bar=false"]
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny.json"), "--resume"]
    for item in sets:
        cmd += ["--set", item]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "starting from step 0" in r.stdout and "done: step 2" in r.stdout
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000002"
