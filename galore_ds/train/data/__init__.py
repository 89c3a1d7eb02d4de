"""Data: documents -> tokens -> packed sequences -> per-rank micro-batches.

    sources.py    read documents (python-stdlib, .txt/.jsonl/.parquet files or dirs, hf:<name>)
    tokenizer.py  a Hugging Face tokenizer, or a local byte-level BPE trained once and cached
    packing.py    token stream cache, packing into fixed-length sequences, train/eval split
    loader.py     deterministic global order, per-rank sharding, resumable position
    streaming.py  the same, streamed: tokenized and packed while training (data.streaming, hf:)
"""
from galore_ds.train.data.loader import StepLoader, eval_batches
from galore_ds.train.data.packing import PackedDataset, build_datasets
from galore_ds.train.data.streaming import StreamLoader, build_streaming

__all__ = ["StepLoader", "eval_batches", "PackedDataset", "build_datasets", "StreamLoader", "build_streaming"]
