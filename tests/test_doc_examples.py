"""The copy-paste examples in README.md and docs/integrations.md run as written: each python
block is executed with only the names a reader supplies (model, dataset, loader, data,
training_args) bound to a tiny LLaMA and tiny data. torchtitan's blocks change a torchtitan
Trainer.Config: they run against a stand-in for the config (torchtitan's model registry needs
its CUDA kernels), and the groups they configure are matched against torchtitan's parameter
names as its container matches them (first pattern wins)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def reader_names() -> dict:
    """What the examples leave to the reader: a model and some data."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 96, (16,), generator=g) for _ in range(32)]
    dataset = [{"input_ids": x, "labels": x} for x in rows]
    batches = [{"input_ids": torch.stack(rows[i:i + 4]), "labels": torch.stack(rows[i:i + 4])} for i in range(0, 32, 4)]
    from transformers import TrainingArguments

    args = TrainingArguments("out", max_steps=2, per_device_train_batch_size=4, use_cpu=True, report_to=[])
    # hidden 128: every attention/MLP matrix admits the examples' rank 128
    return {"model": tiny_llama(hidden=128, inter=256, vocab=96), "dataset": dataset, "ds": dataset, "loader": batches, "data": batches,
            "training_args": args}


def run(code: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    scope = reader_names()
    before = {k: v.detach().clone() for k, v in scope["model"].named_parameters()}
    exec(compile(code, "<doc example>", "exec"), scope)
    after = dict(scope["model"].named_parameters())
    assert any(not torch.equal(before[k], after[k].detach()) for k in before), "the example trained nothing"
    return scope


RUNNABLE = [b for b in blocks(ROOT / "docs" / "integrations.md") if "torchtitan" not in b]


@pytest.mark.parametrize("code", RUNNABLE, ids=lambda b: b.split("import ")[1].split()[0])
def test_integrations_examples_run(tmp_path, monkeypatch, code):
    if "trainer.train()" in code:  # the docs' TrainingArguments with a step budget for the test
        code = code.replace('TrainingArguments("out", ', 'TrainingArguments("out", max_steps=2, use_cpu=True, report_to=[], ')
    run(code, tmp_path, monkeypatch)


def test_readme_library_example_runs(tmp_path, monkeypatch):
    run(blocks(ROOT / "README.md")[0], tmp_path, monkeypatch)


def test_readme_trainer_example_runs(tmp_path, monkeypatch):
    code = blocks(ROOT / "README.md")[1] + "\ntrainer.train()\n"
    run(code, tmp_path, monkeypatch)


def test_readme_accelerate_example_runs(tmp_path, monkeypatch):
    code = blocks(ROOT / "README.md")[2] + """
for batch in loader:
    accelerator.backward(model(**batch).loss)
    opt.step(); opt.zero_grad()
"""
    run(code, tmp_path, monkeypatch)


@pytest.mark.parametrize("where", ["README.md", "docs/integrations.md"])
def test_torchtitan_examples_configure_the_galore_container(where):
    from types import SimpleNamespace

    from galore_ds.integrations.torchtitan import GaLoreOptimizersContainer

    code = [b for b in blocks(ROOT / where) if "torchtitan" in b][0]
    code = code.replace("from torchtitan.models.llama3.config_registry import llama3_8b\n", "")
    scope = {"config": SimpleNamespace(optimizer=None), "llama3_8b": lambda: SimpleNamespace(optimizer=None)}
    exec(compile(code, "<doc example>", "exec"), scope)
    config = scope["llama3_8b_galore"]() if "llama3_8b_galore" in scope else scope["config"]
    assert isinstance(config.optimizer, GaLoreOptimizersContainer.Config)
    # torchtitan's pattern matching on its parameter names: which group each weight joins
    container_groups = [(pg.pattern, pg.optimizer_kwargs) for pg in config.optimizer.param_groups]
    import re

    def group_of(name):
        return next(kw for pattern, kw in container_groups if re.search(pattern, name))
    assert group_of("layers.0.attention.wq.weight")["rank"] == 1024
    assert group_of("layers.0.feed_forward.w1.weight")["rank"] == 1024
    for name in ("layers.0.attention_norm.weight", "tok_embeddings.weight", "output.weight", "norm.weight"):
        assert "rank" not in group_of(name), name
