"""Streaming text data for the trainer: C4-style documents -> token batches, resumable exactly.

Pipeline, per rank::

    datasets.load_dataset(..., streaming=True)   Hub name or local json/jsonl(.gz)/parquet/txt/glob
      .shuffle(seed=42, buffer_size=1)           shard (file) order, as datasets seeds it
    -> Documents                                 1000-document shuffle buffer seeded 42; this
                                                 rank's share; epochs when the stream ends
    -> TokenBatches                              truncate-and-pad (pad masked) or packing

Why our own shuffle buffer: ``IterableDataset.state_dict()`` restores the source position
but not the content of datasets' shuffle buffer (it is refilled on resume, so the order
changes). Keeping the buffer here lets a checkpoint store it, and resume is exact.

Sharding: with a number of shards divisible by the world size, each rank streams its own
shards (datasets' ``split_dataset_by_node(strategy="shards")``). Otherwise every rank reads
the same shuffled stream and keeps documents ``rank, rank + W, ...``: then a step of W ranks
sees exactly the documents of one process with a W times larger batch.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

SHUFFLE_SEED = 42  # the papers' C4 shuffle seed
BUFFER_SIZE = 1000  # datasets' default shuffle buffer
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
HUB_CONFIGS = {"allenai/c4": "en", "c4": "en"}


class DataError(ValueError):
    """Data that cannot be used: missing, empty, unreadable, or ids beyond the model vocab."""


def _builder(path: str) -> str | None:
    name = path.lower()
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    return BUILDERS.get(os.path.splitext(name)[1])


def _local_files(spec: str) -> list[str] | None:
    """The files a local spec names (a file, a directory, a glob), or None for a Hub name."""
    if any(c in spec for c in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
    elif os.path.isdir(spec):
        files = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and _builder(str(p)))
    elif os.path.exists(spec) or spec.startswith((".", "/", "~")) or _builder(spec):
        files = [spec]
    else:
        return None
    if not files:
        raise DataError(f"dataset {spec!r}: no files match")
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"dataset {spec!r}: {f} is not a readable file")
    return files


def _json_features(path: str):
    """All top-level fields of the first record as strings: datasets would otherwise infer
    C4's ``timestamp`` as a timestamp type, unlike the Hub's C4 (all strings)."""
    from datasets import Features, Value

    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            first = f.readline()
        record = json.loads(first) if first.strip() else None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"dataset file {path}: unreadable as JSON lines ({e})") from None
    if record is None:
        raise DataError(f"dataset file {path} is empty")
    if not isinstance(record, dict) or "text" not in record:
        raise DataError(f"dataset file {path}: records need a 'text' field")
    if not all(isinstance(v, str) for v in record.values()):
        return None  # not C4-like: let datasets infer the types
    return Features({k: Value("string") for k in record})


def open_source(spec: str, split: str = "train") -> Callable[[int], object]:
    """A function ``epoch -> datasets.IterableDataset`` for a Hub name or local files, with
    shard order shuffled (seed 42, varied by epoch). Raises DataError when it cannot load."""
    import datasets

    # datasets warns that our buffer_size=1 shuffle "buffer" is not restored: by design.
    datasets.logging.set_verbosity_error()
    files = _local_files(spec)
    if files is None:
        kwargs = dict(path=spec, name=HUB_CONFIGS.get(spec), split=split)
    else:
        builders = {_builder(f) for f in files}
        if len(builders) != 1 or None in builders:
            raise DataError(f"dataset {spec!r}: files must all be one of {', '.join(BUILDERS)} (optionally compressed)")
        builder = builders.pop()
        features = _json_features(files[0]) if builder == "json" else None
        kwargs = dict(path=builder, data_files=files, split="train", features=features)

    def load(epoch: int):
        try:
            ds = datasets.load_dataset(**kwargs, streaming=True)
        except Exception as e:  # datasets raises many types (offline, missing split, bad file)
            raise DataError(f"cannot load dataset {spec!r} ({split}): {_first_line(e)}") from None
        ds = ds.shuffle(seed=SHUFFLE_SEED, buffer_size=1)
        ds.set_epoch(epoch)
        return ds

    load(0)  # fail now, not at the first batch, when the source cannot be opened
    return load


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class Documents:
    """Texts of a streamed dataset in a seeded shuffled order, this rank's share of them,
    epoch after epoch (or one epoch: ``epochs=1``). ``state_dict()`` between two documents
    resumes exactly there."""

    def __init__(self, load, rank=0, world_size=1, epochs=None, buffer_size=BUFFER_SIZE, name="dataset"):
        self.load, self.rank, self.world_size = load, rank, world_size
        self.epochs, self.buffer_size, self.name = epochs, buffer_size, name
        self._start_epoch(0)

    def _start_epoch(self, epoch):
        self.epoch, self.index, self.kept, self.buffer = epoch, 0, 0, []
        self.rng = np.random.default_rng([SHUFFLE_SEED, epoch])
        self.source_state, self._source = None, None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "kept": self.kept,
            "buffer": list(self.buffer),
            "rng": self.rng.bit_generator.state,
            "source": self._source.state_dict() if self._source is not None else self.source_state,
        }

    def load_state_dict(self, state: dict) -> None:
        self._start_epoch(state["epoch"])
        self.index, self.kept, self.buffer = state["index"], state["kept"], list(state["buffer"])
        self.rng.bit_generator.state = state["rng"]
        self.source_state = state["source"]

    def _source_texts(self) -> Iterator[str]:
        from datasets.distributed import split_dataset_by_node

        ds = self.load(self.epoch)
        self.by_shards = self.world_size > 1 and ds.num_shards % self.world_size == 0
        if self.by_shards:
            ds = split_dataset_by_node(ds, self.rank, self.world_size, strategy="shards")
        if self.source_state is not None:
            ds.load_state_dict(self.source_state)
        self._source = ds
        try:
            for example in ds:
                if "text" not in example:
                    raise DataError(f"{self.name}: records need a 'text' field, got {sorted(example)}")
                yield example["text"]
        except DataError:
            raise
        except Exception as e:  # a corrupt file deep in the stream
            raise DataError(f"{self.name}: unreadable ({_first_line(e)})") from None

    def _shuffled(self) -> Iterator[str]:
        # Keep a full buffer; each new text replaces a random one, which is emitted.
        for text in self._source_texts():
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(text)
                continue
            i = int(self.rng.integers(len(self.buffer)))
            out, self.buffer[i] = self.buffer[i], text
            yield out
        while self.buffer:
            i = int(self.rng.integers(len(self.buffer)))
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
            yield self.buffer.pop()

    def __iter__(self) -> Iterator[str]:
        while True:
            for text in self._shuffled():
                self.index += 1
                if self.by_shards or (self.index - 1) % self.world_size == self.rank:
                    self.kept += 1
                    yield text
            if self.kept == 0:
                raise DataError(f"{self.name} is empty (no documents for rank {self.rank})")
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                return
            self._start_epoch(self.epoch + 1)


class TokenBatches:
    """Micro-batches ``{"input_ids", "labels"}`` (B x L int64) from :class:`Documents`.

    Truncate-and-pad (default, the papers' recipe): one document per row, cut at L tokens,
    right-padded; labels are -100 on padding. Packing: documents (each ending in EOS) are
    concatenated and cut into rows of L tokens, every token a label; rows then span
    document boundaries. Raises DataError for a token id >= ``vocab_size``."""

    def __init__(self, docs: Documents, tokenizer, batch_size: int, max_length: int, vocab_size: int, packing=False):
        self.docs, self.tokenizer, self.batch_size = docs, tokenizer, batch_size
        self.max_length, self.vocab_size, self.packing = max_length, vocab_size, packing
        self.carry: list[int] = []  # packing: tokens read but not yet batched

    def state_dict(self) -> dict:
        return {"docs": self.docs.state_dict(), "carry": list(self.carry)}

    def load_state_dict(self, state: dict) -> None:
        self.docs.load_state_dict(state["docs"])
        self.carry = list(state["carry"])

    def __iter__(self) -> Iterator[dict]:
        rows = self._packed() if self.packing else self._padded()
        for batch in rows:
            self._check_vocab(batch["input_ids"])
            yield batch

    def _padded(self):
        texts = []
        for text in self.docs:
            texts.append(text)
            if len(texts) == self.batch_size:
                yield self._pad(texts)
                texts = []
        if texts:  # the end of a single-epoch stream (evaluation)
            yield self._pad(texts)

    def _pad(self, texts):
        enc = self.tokenizer(
            texts, max_length=self.max_length, truncation=True, padding="max_length", return_tensors="pt"
        )
        ids = enc["input_ids"]
        return {"input_ids": ids, "labels": ids.masked_fill(enc["attention_mask"] == 0, -100)}

    def _packed(self):
        eos = self.tokenizer.eos_token_id
        need = self.batch_size * self.max_length
        for text in self.docs:
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            self.carry.extend(ids)
            if len(self.carry) >= need:
                ids = torch.tensor(self.carry[:need]).view(self.batch_size, self.max_length)
                self.carry = self.carry[need:]
                yield {"input_ids": ids, "labels": ids.clone()}

    def _check_vocab(self, ids):
        top = int(ids.max())
        if top >= self.vocab_size:
            token = self.tokenizer.convert_ids_to_tokens(top)
            raise DataError(
                f"{self.docs.name}: token id {top} ({token}) is outside the model's vocab_size "
                f"{self.vocab_size}; use a model config with vocab_size >= {len(self.tokenizer)}"
            )


def load_tokenizer(spec: str):
    """A Hugging Face tokenizer by name or local directory, right-padding, with a pad token
    (EOS if it has none: pad positions are masked by the attention mask, not by id)."""
    from transformers import AutoTokenizer

    try:
        # a huge model_max_length: packing tokenizes whole documents, which is not an error
        tok = AutoTokenizer.from_pretrained(spec, model_max_length=10**9)
    except Exception as e:
        raise DataError(f"cannot load tokenizer {spec!r}: {_first_line(e)}") from None
    tok.padding_side = "right"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise DataError(f"tokenizer {spec!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def count_tokens(batch: dict) -> tuple[int, int]:
    """(real input tokens, predicted tokens) of a batch: the latter are the loss terms,
    labels shifted by one position."""
    labels = batch["labels"]
    return int((labels != -100).sum()), int((labels[:, 1:] != -100).sum())
