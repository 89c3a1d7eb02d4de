"""Documents from a data source, always in the same order (sorted paths, file order)."""
from __future__ import annotations

import json
import sysconfig
from itertools import islice
from pathlib import Path
from typing import Iterator

from galore_ds.train.config import BUILTIN_SOURCE, HF_PREFIX

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
# Parts of the stdlib that are tests, vendored code or data generators: skipped so the
# embedded corpus is ordinary, documented library code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__",
                "turtledemo", "encodings", "pydoc_data", "ensurepip"}


def stdlib_files() -> list[Path]:
    """The standard library's .py sources, sorted: text every Python install carries."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _STDLIB_SKIP.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _file_docs(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    text = json.loads(line).get(text_field)
                    if text:
                        yield text
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional dependency, checked at validation

        table = pq.read_table(path, columns=[text_field])
        for text in table.column(text_field).to_pylist():
            if text:
                yield text
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _hf_docs(name: str, split: str, config: str | None, text_field: str) -> Iterator[str]:
    import datasets  # optional dependency, checked at validation

    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for row in ds:
        if row.get(text_field):
            yield row[text_field]


def iter_documents(source: str, text_field: str = "text", hf_split: str = "train",
                   hf_config: str | None = None) -> Iterator[str]:
    if source == BUILTIN_SOURCE:
        for p in stdlib_files():
            yield p.read_text(encoding="utf-8", errors="replace")
    elif source.startswith(HF_PREFIX):
        yield from _hf_docs(source[len(HF_PREFIX):], hf_split, hf_config, text_field)
    else:
        path = Path(source)
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl", ".parquet"))
        for f in files:
            yield from _file_docs(f, text_field)


def stream_documents(source: str, text_field: str = "text", hf_split: str = "train",
                     hf_config: str | None = None, skip: int = 0) -> Iterator[str]:
    """Documents from number `skip` on, for the streaming loader: a resume passes the count it
    consumed. An hf: record without text yields "" (it keeps its number, because
    IterableDataset.skip counts records); skipping reads past records without tokenizing them."""
    if not source.startswith(HF_PREFIX):
        yield from islice(iter_documents(source, text_field, hf_split, hf_config), skip, None)
        return
    import datasets  # optional dependency, checked at validation

    ds = datasets.load_dataset(source[len(HF_PREFIX):], hf_config, split=hf_split, streaming=True)
    for row in ds.skip(skip) if skip else ds:
        yield row.get(text_field) or ""


def read_documents(source: str, text_field: str = "text", max_chars: int = 0, hf_split: str = "train",
                   hf_config: str | None = None) -> list[str]:
    """Documents in order; stops (truncating the last one) at max_chars characters if > 0."""
    docs, total = [], 0
    for doc in iter_documents(source, text_field, hf_split, hf_config):
        if max_chars and total + len(doc) > max_chars:
            if max_chars - total > 0:
                docs.append(doc[: max_chars - total])
            break
        docs.append(doc)
        total += len(doc)
    return docs
