"""Token stream -> fixed-length sequences; the stream is cached so runs after the first (and
every rank of a multi-rank run) skip tokenisation."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from galore_ds.train.config import ConfigError, DataConfig
from galore_ds.train.data.sources import read_documents
from galore_ds.train.data.tokenizer import TextTokenizer, corpus_hash, get_tokenizer


class PackedDataset:
    """Documents joined with EOS and cut into seq_len-token sequences (remainder dropped).
    Labels equal inputs: LlamaForCausalLM shifts them itself."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.seq_len = seq_len
        n = tokens.numel() // seq_len
        self.data = tokens[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.data.shape[0]

    def batch(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.data[torch.as_tensor(indices, dtype=torch.long)].long()
        return {"input_ids": x, "labels": x}


def token_stream(docs: list[str], tok: TextTokenizer, cache_dir: str | os.PathLike) -> torch.Tensor:
    key = hashlib.sha256(f"{tok.key}-{corpus_hash(docs)}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"tokens-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    ids: list[int] = []
    for i in range(0, len(docs), 256):
        for seq in tok.encode_batch(docs[i: i + 256]):
            ids.extend(seq)
            ids.append(tok.eos_id)
    tokens = torch.tensor(ids, dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(tokens, tmp)
    os.replace(tmp, path)
    return tokens


def build_datasets(d: DataConfig, vocab_size: int) -> tuple[TextTokenizer, PackedDataset, PackedDataset]:
    """(tokenizer, train, eval). Without data.eval_source the eval set is the last
    data.eval_fraction of the token stream (the last documents: never trained on)."""
    docs = read_documents(d.source, d.text_field, d.max_chars, d.hf_split, d.hf_config)
    if not docs:
        raise ConfigError("data.source", f"{d.source!r} yielded no documents", "point it at non-empty text")
    tok = get_tokenizer(d.tokenizer, docs, vocab_size, d.cache_dir)
    if tok.vocab_size > vocab_size:
        raise ConfigError("model.vocab_size", f"{vocab_size} is smaller than the tokenizer's {tok.vocab_size}",
                          f"set model.vocab_size >= {tok.vocab_size}")
    tokens = token_stream(docs, tok, d.cache_dir)
    if d.eval_source is not None:
        eval_docs = read_documents(d.eval_source, d.text_field, d.max_chars, d.hf_eval_split, d.hf_config)
        eval_tokens = token_stream(eval_docs, tok, d.cache_dir)
    else:
        cut = int(tokens.numel() * (1 - d.eval_fraction))
        tokens, eval_tokens = tokens[:cut], tokens[cut:]
    train, evals = PackedDataset(tokens, d.seq_len), PackedDataset(eval_tokens, d.seq_len)
    if len(train) == 0:
        raise ConfigError("data.source", f"has fewer than data.seq_len={d.seq_len} tokens for training",
                          "add text or lower data.seq_len")
    return tok, train, evals
