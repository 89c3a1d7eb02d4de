"""Streaming data (data.streaming, the default for hf: sources): a local folder of jsonl files
stands in for the hub (HF_DATASETS_OFFLINE=1) and a BPE trained here, saved as a Hugging Face
tokenizer folder, stands in for t5-base. The streamed rows are the in-memory packer's rows,
ranks share one global row sequence, a resume (on any world size) continues it exactly without
re-tokenizing what was consumed, and the stream wraps at its end."""
from __future__ import annotations

import io
import json
import math
import random
from functools import partial

import pytest
import torch

from galore_ds.train.config import ConfigError, DataConfig, DistEnv, from_dict, validate
from galore_ds.train.data import StepLoader, StreamLoader, build_streaming
from galore_ds.train.data.packing import PackedDataset, token_stream
from galore_ds.train.data.sources import read_documents, stream_documents
from galore_ds.train.data.tokenizer import EOS, HFTokenizer, train_bpe
from recipes import tiny_recipe

WORDS = "the of model rank gradient low memory train step optimizer matrix layer token data stream".split()


def _text(i: int, rng: random.Random) -> str:
    # unique (the index) and of very different lengths, so rows span documents and some
    # documents span several rows
    return f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 5, 12, 40])))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, tokenizer folder): two train shards with a few empty records, a validation file."""
    root = tmp_path_factory.mktemp("stream")
    data = root / "corpus"
    data.mkdir()
    rng = random.Random(0)
    texts = [_text(i, rng) if i % 17 else "" for i in range(240)]  # every 17th record has no text
    for s, part in enumerate((texts[:120], texts[120:])):
        (data / f"train-0000{s}-of-00002.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    (data / "validation.jsonl").write_text("".join(json.dumps({"text": f"held out {i} " + _text(i, rng)}) + "\n"
                                                   for i in range(30)))
    train_bpe([t for t in texts if t], 300, root / "bpe.json")
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(root / "bpe.json"), eos_token=EOS).save_pretrained(root / "tok")
    return data, root / "tok"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="module")
def tok(corpus):
    return HFTokenizer(str(corpus[1]))


def loader(corpus, tok, world: int = 1, rank: int = 0, g: int = 8, micro: int = 2, seq: int = 16,
           max_chars: int = 0) -> StreamLoader:
    docs = partial(stream_documents, f"hf:{corpus[0]}", "text", "train", None)
    return StreamLoader(docs, tok, seq, g, micro, rank, world, max_chars)


def rows(step: list[dict]) -> torch.Tensor:
    return torch.cat([b["input_ids"] for b in step])


def test_streamed_rows_are_the_in_memory_packers_rows(corpus, tok, tmp_path):
    docs = read_documents(f"hf:{corpus[0]}")
    packed = PackedDataset(token_stream(docs, tok, tmp_path), 16)
    ld = loader(corpus, tok)
    n = len(packed) // 8  # whole steps before the stream runs out
    got = torch.cat([rows(ld.next_step()) for _ in range(n)])
    assert n > 50 and torch.equal(got, packed.data[: n * 8].long())
    b = ld.next_step()[0]
    assert b["input_ids"].dtype == torch.long and b["labels"] is b["input_ids"] and b["input_ids"].shape == (2, 16)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_make_the_one_rank_global_batch(corpus, tok, world):
    one = loader(corpus, tok)
    ranks = [loader(corpus, tok, world, r, micro=1) for r in range(world)]
    for _ in range(80):  # crosses the end of the stream (75 steps) and wraps
        assert torch.equal(torch.cat([rows(r.next_step()) for r in ranks]), rows(one.next_step()))
    assert one.epoch == ranks[-1].epoch == 1.0


@pytest.mark.parametrize("world", [1, 2, 4])
def test_resume_continues_the_uninterrupted_rows_on_any_world_size(corpus, tok, world):
    ref = loader(corpus, tok)
    expected = [rows(ref.next_step()) for _ in range(80)]
    first = loader(corpus, tok)
    for _ in range(45):  # past the first shard (120 records): skip crosses files
        first.next_step()
    state = torch.load(_saved(first.state_dict()), weights_only=True)  # what a checkpoint holds
    ranks = [loader(corpus, tok, world, r, micro=1) for r in range(world)]
    for r in ranks:
        r.load_state_dict(state)
    for step in range(45, 80):  # through the wrap at the end of the stream (75 steps)
        assert torch.equal(torch.cat([rows(r.next_step()) for r in ranks]), expected[step]), step
    assert ranks[0].position == ref.position and ranks[0].epoch == ref.epoch


def _saved(obj) -> io.BytesIO:
    """obj through torch.save, as a checkpoint's trainer.pt holds it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


class CountingTokenizer:
    """The tokenizer, recording every text it is asked to encode."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []
        self.eos_id, self.vocab_size, self.key = tok.eos_id, tok.vocab_size, tok.key

    def encode_batch(self, texts):
        self.seen += texts
        return self.tok.encode_batch(texts)


def test_resume_does_not_retokenize_consumed_documents(corpus, tok):
    first = loader(corpus, tok)
    for _ in range(45):
        first.next_step()
    state = first.state_dict()
    assert state["doc"] > 120 and 0 <= state["offset"] < 16 * 8
    counting = CountingTokenizer(tok)
    resumed = loader(corpus, counting)
    resumed.load_state_dict(state)
    resumed.next_step()
    records = list(stream_documents(f"hf:{corpus[0]}"))
    consumed = {t for t in records[: state["doc"]] if t}
    cursor_doc = next(t for t in records[state["doc"]:] if t)  # empty records are never tokenized
    assert counting.seen and counting.seen[0] == cursor_doc  # starts at the cursor's document
    assert not consumed.intersection(counting.seen)


def test_end_of_stream_wraps_and_counts_passes(corpus, tok, capsys):
    ld = loader(corpus, tok, max_chars=3000)  # max_chars ends the stream early, as the source's end would
    docs = read_documents(f"hf:{corpus[0]}", max_chars=3000)
    per_pass = len(PackedDataset(_tokens(docs, tok), 16))  # rows in one pass
    steps = [rows(ld.next_step()) for _ in range(per_pass // 8 + 3)]
    assert ld.epoch == 1.0 and "stream ended" in capsys.readouterr().out
    flat = torch.cat(steps)
    # the tail shorter than a row is dropped and the second pass starts at the first row again
    assert torch.equal(flat[per_pass: per_pass + 8], flat[:8])
    with pytest.raises(ConfigError, match="data.source: .*fewer than data.seq_len"):
        loader(corpus, tok, max_chars=20).next_step()  # a pass without one row: never loops


def _tokens(docs, tok) -> torch.Tensor:
    ids = []
    for seq in tok.encode_batch(docs):
        ids += seq + [tok.eos_id]
    return torch.tensor(ids, dtype=torch.int32)


def _data(corpus, **over) -> DataConfig:
    return DataConfig(source=f"hf:{corpus[0]}", tokenizer=str(corpus[1]), seq_len=16, **over)


def test_eval_head_is_held_out_and_eval_source_is_its_first_rows(corpus, tok):
    _, ld, evals = build_streaming(_data(corpus), 300, global_batch=8, micro_batch=2, eval_batches=2,
                                   rank=0, world_size=1)
    packed = PackedDataset(_tokens(read_documents(f"hf:{corpus[0]}"), tok), 16)
    assert torch.equal(evals.data, packed.data[:16])  # eval_batches * global_batch rows
    records = list(stream_documents(f"hf:{corpus[0]}"))
    start = ld.start_doc
    assert start > 0 and ld.state_dict()["offset"] == 0  # training starts on a document boundary
    first = rows(ld.next_step())[0].tolist()
    ids = (tok.encode_batch([records[start]])[0] + [tok.eos_id])[:16]
    assert records[start] and first[: len(ids)] == ids
    held = set(map(tuple, evals.data.tolist()))
    assert not held.intersection(map(tuple, rows(ld.next_step()).tolist()))

    _, _, ev = build_streaming(_data(corpus, eval_source=f"hf:{corpus[0]}"), 300, 8, 2, 3, 0, 2)
    val = PackedDataset(_tokens(read_documents(f"hf:{corpus[0]}", hf_split="validation"), tok), 16)
    assert len(ev) == 3 * 2 and torch.equal(ev.data, val.data[:6])  # eval_batches * micro_batch, any world size


def test_train_runs_on_a_streamed_hf_folder(corpus, tmp_path):
    from galore_ds.train.trainer import train

    rec = tiny_recipe(tmp_path, str(tmp_path / "cache"), data__source=f"hf:{corpus[0]}",
                      data__tokenizer=str(corpus[1]), data__max_chars=0, training__steps=8,
                      engine__mode="single")
    cfg = validate(from_dict(rec), DistEnv())
    assert cfg.data.streamed
    out = train(cfg, DistEnv())
    assert math.isfinite(out["first_loss"]) and math.isfinite(out["last_loss"]) and math.isfinite(out["eval_loss"])
    assert out["last_loss"] < out["first_loss"]
    saved = torch.load(tmp_path / "ckpt" / "step-0000008" / "trainer.pt", weights_only=True)["data"]
    assert saved["position"] == 8 * 8 and saved["doc"] > 0
    rec["training"]["steps"], rec["checkpoint"]["resume"] = 10, "latest"  # the trainer resumes the stream
    out = train(validate(from_dict(rec), DistEnv()), DistEnv())
    resumed = torch.load(tmp_path / "ckpt" / "step-0000010" / "trainer.pt", weights_only=True)["data"]
    assert out["step"] == 10 and math.isfinite(out["last_loss"]) and resumed["position"] == 10 * 8


def _check(tmp_path, **data):
    rec = tiny_recipe(tmp_path, str(tmp_path / "cache"), **{f"data__{k}": v for k, v in data.items()})
    return validate(from_dict(rec), DistEnv())


@pytest.mark.parametrize("data, key", [
    ({"tokenizer": "bpe"}, "data.tokenizer"),                       # a stream has no corpus to train on
    ({"streaming": True, "source": "python-stdlib", "tokenizer": "bpe"}, "data.tokenizer"),
    ({"streaming": False, "max_chars": 0}, "data.max_chars"),       # the in-memory packer needs a bound
    ({"streaming": "yes"}, "data.streaming"),
])
def test_streaming_recipe_errors_name_the_key(corpus, tmp_path, data, key):
    with pytest.raises(ConfigError) as e:
        _check(tmp_path, **{"source": f"hf:{corpus[0]}", "tokenizer": str(corpus[1]), "max_chars": 0, **data})
    assert e.value.key == key and "\n" not in str(e.value) and e.value.fix


def test_streaming_recipes_that_validate(corpus, tmp_path):
    hf = {"source": f"hf:{corpus[0]}", "tokenizer": str(corpus[1])}
    assert _check(tmp_path, **hf, max_chars=0).data.streamed  # hf: streams by default, 0 = whole stream
    assert not _check(tmp_path, **{**hf, "tokenizer": "bpe"}, streaming=False, max_chars=10_000).data.streamed
    assert not _check(tmp_path).data.streamed  # local sources stay in memory unless asked


def test_checkpoint_of_the_other_loader_is_refused(corpus, tok):
    ds = PackedDataset(torch.arange(64, dtype=torch.int32), 16)
    with pytest.raises(ConfigError, match="^data.streaming: "):
        loader(corpus, tok).load_state_dict(StepLoader(ds, 2, 1, 0, 1).state_dict())
    with pytest.raises(ConfigError, match="^data.streaming: "):
        StepLoader(ds, 2, 1, 0, 1).load_state_dict(loader(corpus, tok).state_dict())
