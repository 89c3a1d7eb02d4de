"""Data: the embedded corpus is deterministic, the BPE is cached, packing is exact, ranks see
disjoint shards of each global batch, and the position resumes the same stream."""
from __future__ import annotations

import json

import torch

from galore_ds.train.config import DataConfig
from galore_ds.train.data import StepLoader, build_datasets, eval_batches
from galore_ds.train.data.packing import PackedDataset
from galore_ds.train.data.sources import read_documents, stdlib_files


def test_stdlib_corpus_is_deterministic_and_needs_no_download():
    files = stdlib_files()
    assert len(files) > 100 and not any("site-packages" in p.parts for p in files)
    a = read_documents("python-stdlib", max_chars=50_000)
    b = read_documents("python-stdlib", max_chars=50_000)
    assert a == b and sum(map(len, a)) == 50_000


def test_jsonl_and_txt_directory_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)) + "\n")
    (tmp_path / "b.txt").write_text("plain text")
    assert read_documents(str(tmp_path)) == ["doc 0", "doc 1", "doc 2", "plain text"]
    assert read_documents(str(tmp_path / "a.jsonl"), max_chars=8) == ["doc 0", "doc"]


def test_bpe_is_trained_once_and_cached(tmp_path):
    d = DataConfig(source="python-stdlib", max_chars=60_000, seq_len=32, cache_dir=str(tmp_path))
    tok, train, evals = build_datasets(d, 400)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.startswith("bpe-400-") for f in files) and any(f.startswith("tokens-") for f in files)
    tok2, train2, _ = build_datasets(d, 400)
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # nothing retrained
    assert torch.equal(train.data, train2.data) and tok.vocab_size <= 400
    assert len(evals) > 0 and train.data.shape[1] == 32
    assert int(train.data.max()) < 400


def test_packing_drops_only_the_remainder():
    ds = PackedDataset(torch.arange(23, dtype=torch.int32), 5)
    assert len(ds) == 4 and ds.batch([3])["input_ids"].tolist() == [[15, 16, 17, 18, 19]]


def test_ranks_get_disjoint_shards_of_the_same_global_batch():
    ds = PackedDataset(torch.arange(40 * 4, dtype=torch.int32), 4)  # 40 sequences, first token = 4*index
    one = StepLoader(ds, global_batch=8, micro_batch=2, rank=0, world_size=1, seed=3)
    two = [StepLoader(ds, 8, 2, r, 2, seed=3) for r in range(2)]
    for _ in range(12):  # crosses epoch boundaries (40 / 8 = 5 steps per epoch)
        full = torch.cat([b["input_ids"][:, 0] for b in one.next_step()])
        parts = [torch.cat([b["input_ids"][:, 0] for b in ldr.next_step()]) for ldr in two]
        assert torch.equal(torch.cat(parts), full) and len(set(full.tolist())) == 8


def test_resumed_position_sees_the_same_sequences():
    ds = PackedDataset(torch.arange(30 * 4, dtype=torch.int32), 4)
    a = StepLoader(ds, 6, 3, 0, 1, seed=1)
    ref = [a.next_step() for _ in range(9)]
    b = StepLoader(ds, 6, 3, 0, 1, seed=1)
    for _ in range(4):
        b.next_step()
    c = StepLoader(ds, 6, 3, 0, 1, seed=1)
    c.load_state_dict(b.state_dict())
    for step in range(4, 9):
        got = c.next_step()
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(got, ref[step]))


def test_eval_uses_the_same_sequences_on_every_world_size():
    """eval_batches micro-batches in all, split across ranks (a rank may get one fewer): the
    eval loss cannot change with the world size."""
    ds = PackedDataset(torch.arange(10 * 2, dtype=torch.int32), 2)
    counted = lambda batches: sorted(b["input_ids"][:, 0].tolist() for b in batches  # noqa: E731
                                     if float(b["eval_weight"]) == 1.0)
    one = eval_batches(ds, 4, 2, 0, 1)
    assert counted(one) == [[0, 2], [4, 6], [8, 10], [12, 14]]
    for world in (2, 3, 4, 5):
        parts = [eval_batches(ds, 4, 2, r, world) for r in range(world)]
        assert counted([b for part in parts for b in part]) == counted(one)
        # every rank runs the same number of forwards (a sharded forward is a collective)
        assert len({len(part) for part in parts}) == 1


def test_parquet_source_reads_the_text_column_in_file_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, rows in (("b.parquet", ["third", "fourth"]), ("a.parquet", ["first", "", "second"])):
        pq.write_table(pa.table({"text": rows, "id": list(range(len(rows)))}), tmp_path / name)
    assert read_documents(str(tmp_path)) == ["first", "second", "third", "fourth"]  # empty rows skipped
    assert read_documents(str(tmp_path / "b.parquet"), max_chars=8) == ["third", "fou"]


def test_hf_dataset_source_streams_without_a_network(tmp_path, monkeypatch):
    """data.source = "hf:<name or path>" goes through datasets.load_dataset(streaming=True);
    a local data directory stands in for the hub here (HF_DATASETS_OFFLINE=1)."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(5)) + "\n")
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs.get("streaming"))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert read_documents(f"hf:{data}", max_chars=17) == ["row 0", "row 1", "row 2", "ro"]
    assert calls == [True]
