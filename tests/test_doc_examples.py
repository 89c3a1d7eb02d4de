"""The copy-paste examples in README.md and docs/integrations.md run as written: each python
block is executed with only the names a reader supplies (model, dataset, loader, data,
training_args) bound to a tiny LLaMA and tiny data. torchtitan's block needs torchtitan, which
is not installed here: its calls are tested in tests/test_torchtitan.py."""
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
