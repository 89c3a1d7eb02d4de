"""Tokenizers: a Hugging Face one by name or path, or a local byte-level BPE.

The local BPE (data.tokenizer = "bpe") is trained once on the training documents with the
`tokenizers` package, vocab = model.vocab_size, and cached under data.cache_dir keyed by a
hash of the corpus and the vocab size, so later runs (and every rank) load the same file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

EOS = "<|endoftext|>"


class TextTokenizer(Protocol):
    eos_id: int
    vocab_size: int
    key: str  # identifies the tokenizer in cache keys

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class BPETokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.eos_id = self.tok.token_to_id(EOS)
        self.vocab_size = self.tok.get_vocab_size()
        self.key = "bpe-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


class HFTokenizer:
    def __init__(self, name: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(name)
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        self.eos_id = 0 if eos is None else eos
        self.vocab_size = len(self.tok)
        self.key = "hf-" + hashlib.sha256(name.encode()).hexdigest()[:16]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def corpus_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_bpe(docs: list[str], vocab_size: int, path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file


def get_tokenizer(name: str, docs: list[str], vocab_size: int, cache_dir: str | os.PathLike) -> TextTokenizer:
    if name != "bpe":
        return HFTokenizer(name)
    path = Path(cache_dir) / f"bpe-{vocab_size}-{corpus_hash(docs)}.json"
    if not path.exists():
        train_bpe(docs, vocab_size, path)
    return BPETokenizer(path)
