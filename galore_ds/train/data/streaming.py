"""Streaming data: documents -> tokens -> seq_len rows while training, nothing held in memory
beyond the current step (data.streaming; the default for hf: sources such as C4).

Order. Documents come in stream order (C4 is shuffled upstream; there is no shuffle buffer),
each tokenized on its own and followed by EOS, the token stream cut into seq_len rows; a row
may span documents and the tail shorter than a row is dropped -- exactly the rows the
in-memory packer (packing.py) makes from the same documents.

Sharding. Optimizer step s consumes global rows [s*G, (s+1)*G); rank r keeps its contiguous
G/W of them, cut into micro-batches (the StepLoader convention). Row boundaries depend on
every earlier token, so each rank tokenizes the whole global batch and keeps its slice: the
price of a global row sequence that does not depend on the world size.

Resume. The state at a step boundary is the cursor where the next row starts -- document
number `doc` and token `offset` inside it -- plus rows consumed, passes and characters read,
all plain ints. Loading it reopens the stream at document `doc` (IterableDataset.skip: the
consumed records are read past, never tokenized) and drops `offset` tokens, so a resumed run,
on any world size, yields the rows an uninterrupted run yields.

End of stream (or of data.max_chars): the loader prints a line and wraps to the start of the
training stream; `epoch` counts completed passes (an integer, since the length of a stream is
unknown until it ends). A pass that yields no row at all is a ConfigError.

Eval. With data.eval_source: the first eval_batches*micro_batch rows of that
stream (split data.hf_eval_split). Without: the first eval_batches*global_batch rows of the
training stream are held out (a head, as the tail of a stream is unknown; sized by the global
batch so it is the same on every world size), and training starts at the first document after
them, so no held-out token is ever trained on.
"""
from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable, Iterator, Optional

import torch

from galore_ds.train.config import ConfigError, DataConfig
from galore_ds.train.data.packing import PackedDataset
from galore_ds.train.data.sources import stream_documents
from galore_ds.train.data.tokenizer import TextTokenizer, get_tokenizer

# skip -> texts of documents skip, skip+1, ... ("" for a record without text)
DocOpener = Callable[[int], Iterator[str]]
_BATCH_DOCS = 64  # documents per tokenizer call: fast tokenizers batch in Rust


class RowStream:
    """seq_len-token rows cut from the documents of `open_docs`, starting `offset` tokens into
    document `doc`; `chars` = characters read before document `doc` (for max_chars)."""

    def __init__(self, open_docs: DocOpener, tok: TextTokenizer, seq_len: int, max_chars: int = 0,
                 doc: int = 0, offset: int = 0, chars: int = 0) -> None:
        self.tok, self.seq_len, self.max_chars = tok, seq_len, max_chars
        self.doc, self.offset, self.chars = doc, offset, chars  # cursor: where the next row starts
        self._texts = open_docs(doc)
        self._read_chars = chars
        # (characters, token ids + EOS) of documents doc, doc+1, ... read but not yet passed
        self._pending: deque[tuple[int, list[int]]] = deque()

    def _fill(self) -> bool:
        """Tokenize the next documents; False when the stream (or max_chars) has ended."""
        texts: list[str] = []
        for text in self._texts:
            if self.max_chars:
                room = self.max_chars - self._read_chars
                if room <= 0:
                    break
                text = text[:room]  # the last document is truncated, as read_documents does
            self._read_chars += len(text)
            texts.append(text)
            if len(texts) == _BATCH_DOCS:
                break
        if not texts:
            return False
        nonempty = [t for t in texts if t]
        ids = iter(self.tok.encode_batch(nonempty) if nonempty else [])
        for t in texts:  # an empty record adds no tokens (not even EOS) but keeps its number
            self._pending.append((len(t), (next(ids) + [self.tok.eos_id]) if t else []))
        return True

    def next_row(self) -> Optional[list[int]]:
        """The next row, or None at the end (the cursor then stays; the short tail is dropped)."""
        row: list[int] = []
        i, off = 0, self.offset
        while len(row) < self.seq_len:
            if i == len(self._pending) and not self._fill():
                return None
            ids = self._pending[i][1]
            take = ids[off: off + self.seq_len - len(row)]
            row += take
            off += len(take)
            if off >= len(ids):
                i, off = i + 1, 0
        for _ in range(i):
            self.chars += self._pending.popleft()[0]
        self.doc, self.offset = self.doc + i, off
        return row

    def to_next_document(self) -> None:
        """Move the cursor past a partly used document (the end of a held-out head)."""
        if self.offset:
            self.chars += self._pending.popleft()[0]
            self.doc, self.offset = self.doc + 1, 0


def first_rows(stream: RowStream, n: int) -> PackedDataset:
    """The first n rows of the stream (fewer if it ends), materialised."""
    rows = []
    while len(rows) < n and (row := stream.next_row()) is not None:
        rows.append(row)
    seq_len = stream.seq_len
    flat = torch.tensor(rows, dtype=torch.int32).flatten() if rows else torch.empty(0, dtype=torch.int32)
    return PackedDataset(flat, seq_len)


class StreamLoader:
    """StepLoader's interface over a RowStream: next_step, position, epoch, state_dict."""

    def __init__(self, open_docs: DocOpener, tok: TextTokenizer, seq_len: int, global_batch: int,
                 micro_batch: int, rank: int, world_size: int, max_chars: int = 0, start_doc: int = 0,
                 start_chars: int = 0, name: str = "data.source") -> None:
        assert global_batch % (micro_batch * world_size) == 0
        self.open_docs, self.tok, self.seq_len, self.max_chars = open_docs, tok, seq_len, max_chars
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size, self.name = rank, world_size, name
        self.start_doc, self.start_chars = start_doc, start_chars  # every pass starts here
        self.position = 0  # global rows consumed
        self.passes = 0    # times the stream ran out and wrapped
        self._open(start_doc, 0, start_chars)

    def _open(self, doc: int, offset: int, chars: int) -> None:
        self._rows = RowStream(self.open_docs, self.tok, self.seq_len, self.max_chars, doc, offset, chars)
        self._empty_pass = (doc, offset) == (self.start_doc, 0)  # True until this pass yields a row

    def _next_row(self) -> list[int]:
        row = self._rows.next_row()
        if row is None:
            if self._empty_pass:  # a whole pass without one row: wrapping would loop forever
                raise ConfigError("data.source", f"{self.name} yields fewer than data.seq_len={self.seq_len} "
                                  "tokens for training", "add text, raise data.max_chars or lower data.seq_len")
            self.passes += 1
            if self.rank == 0:
                print(f"data: the stream ended (pass {self.passes}); starting again at document "
                      f"{self.start_doc}", flush=True)
            self._open(self.start_doc, 0, self.start_chars)
            return self._next_row()
        self._empty_pass = False
        return row

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step; advances the position."""
        per_rank = self.global_batch // self.world_size
        lo = self.rank * per_rank
        mine = []
        for k in range(self.global_batch):  # every rank reads every row: boundaries need all tokens
            row = self._next_row()
            if lo <= k < lo + per_rank:
                mine.append(row)
        self.position += self.global_batch
        x = torch.tensor(mine, dtype=torch.long)
        micro = [x[i: i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]
        return [{"input_ids": b, "labels": b} for b in micro]  # the model shifts labels itself

    @property
    def epoch(self) -> float:
        """Completed passes over the stream (whole numbers: a stream's length is unknown)."""
        return float(self.passes)

    def state_dict(self) -> dict[str, int]:
        r = self._rows
        return {"position": self.position, "doc": r.doc, "offset": r.offset, "chars": r.chars,
                "passes": self.passes, "start_doc": self.start_doc}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        if "doc" not in sd:
            raise ConfigError("data.streaming", "the checkpoint's data position was written by the in-memory "
                              "loader (data.streaming=false)", "resume with the data.streaming setting that wrote it")
        if int(sd["start_doc"]) != self.start_doc:
            raise ConfigError("data.streaming", f"the checkpoint's training stream starts at document "
                              f"{int(sd['start_doc'])}, this recipe's at {self.start_doc} (the held-out eval head "
                              "changed with training.eval_batches/global_batch or data.seq_len)",
                              "resume with the recipe that wrote it, or set data.eval_source")
        self.position, self.passes = int(sd["position"]), int(sd["passes"])
        self._open(int(sd["doc"]), int(sd["offset"]), int(sd["chars"]))


def build_streaming(d: DataConfig, vocab_size: int, global_batch: int, micro_batch: int, eval_batches: int,
                    rank: int, world_size: int) -> tuple[TextTokenizer, StreamLoader, PackedDataset]:
    """(tokenizer, train loader, eval set) for a streamed recipe (see the module docstring)."""
    tok = get_tokenizer(d.tokenizer, [], vocab_size, d.cache_dir)  # validation refused "bpe"
    if tok.vocab_size > vocab_size:
        raise ConfigError("model.vocab_size", f"{vocab_size} is smaller than the tokenizer's {tok.vocab_size}",
                          f"set model.vocab_size >= {tok.vocab_size}")
    train_docs = partial(stream_documents, d.source, d.text_field, d.hf_split, d.hf_config)
    start_doc = start_chars = 0
    if d.eval_source is not None:
        eval_docs = partial(stream_documents, d.eval_source, d.text_field, d.hf_eval_split, d.hf_config)
        evals = first_rows(RowStream(eval_docs, tok, d.seq_len, d.max_chars), eval_batches * micro_batch)
    else:
        head = RowStream(train_docs, tok, d.seq_len, d.max_chars)
        evals = first_rows(head, eval_batches * global_batch)
        head.to_next_document()
        start_doc, start_chars = head.doc, head.chars
    if RowStream(train_docs, tok, d.seq_len, d.max_chars, start_doc, 0, start_chars).next_row() is None:
        raise ConfigError("data.source", f"has fewer than data.seq_len={d.seq_len} tokens for training"
                          + (" after the held-out eval rows" if d.eval_source is None else ""),
                          "add text, raise data.max_chars, lower data.seq_len, or set data.eval_source")
    loader = StreamLoader(train_docs, tok, d.seq_len, global_batch, micro_batch, rank, world_size, d.max_chars,
                          start_doc, start_chars, name=repr(d.source))
    return tok, loader, evals
