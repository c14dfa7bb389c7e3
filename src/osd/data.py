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

Offline: the defaults ``--dataset allenai/c4`` and ``--tokenizer t5-base`` need the Hugging
Face Hub (or its local cache). When the Hub is off (``HF_HUB_OFFLINE=1``) or unreachable,
:func:`open_source` and :func:`load_tokenizer` raise a one-line DataError naming what to pass
instead, e.g. the embedded quickstart sample (:func:`sample_paths`, in ``osd/assets``).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

SHUFFLE_SEED = 42  # the papers' C4 shuffle seed
BUFFER_SIZE = 1000  # datasets' default shuffle buffer
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
HUB_CONFIGS = {"allenai/c4": "en", "c4": "en"}
ASSETS = Path(__file__).resolve().parent / "assets"  # package data: see assets/README.md
FEATURE_LINES = 100  # JSON lines searched for a first record with a 'text' string


class DataError(ValueError):
    """Data that cannot be used: missing, empty, unreadable, or ids beyond the model vocab."""


def sample_paths() -> dict[str, str]:
    """The embedded quickstart sample, keyed by the ``osd-train`` flags that take it:
    ``dataset`` (160 C4 ``en`` documents), ``eval_dataset`` (40 further, held-out documents)
    and ``tokenizer`` (the t5-base tokenizer directory). Absolute paths inside the installed
    package; provenance and licences (C4: ODC-BY; t5-base: Apache-2.0) are in
    ``osd/assets/README.md``. A smoke-test sample for fresh or offline machines, not a corpus."""
    return {
        "dataset": str(ASSETS / "c4-quickstart" / "train.json.gz"),
        "eval_dataset": str(ASSETS / "c4-quickstart" / "validation.json.gz"),
        "tokenizer": str(ASSETS / "t5-base"),
    }


def _offline_setting() -> str | None:
    """The environment variable that switches the Hub off here (``HF_HUB_OFFLINE=1`` ...)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={os.environ[name].strip()}"
    return None


def _hub_unavailable(e: BaseException) -> str | None:
    """Why the Hub could not be used, when ``e`` (or its cause) says it: offline mode or no
    connection. None for other failures (no such dataset, bad file...)."""
    setting = _offline_setting()
    if setting:
        return f"offline here ({setting})"
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = f"{type(e).__name__}: {e}".lower()
        if any(word in text for word in ("connect", "offline", "timeout", "timed out", "couldn't reach")):
            return f"not reachable from here ({_first_line(e)})"
        e = e.__cause__ or e.__context__
    return None


def _sample_flags(*keys: str) -> str:
    paths = sample_paths()
    return " ".join(f"--{k} {paths[k]}" for k in keys)


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
    """All top-level fields of the first record with a ``text`` string, as strings: datasets
    would otherwise infer C4's ``timestamp`` as a timestamp type, unlike the Hub's C4 (all
    strings). A stray record without text among the first lines is skipped later (see
    :class:`Documents`); none with text in the first lines means the file is not C4-like."""
    from datasets import Features, Value

    opener = gzip.open if path.endswith(".gz") else open
    record, lines = None, 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                lines += 1
                candidate = json.loads(line)
                if isinstance(candidate, dict) and isinstance(candidate.get("text"), str):
                    record = candidate
                    break
                if lines >= FEATURE_LINES:
                    break
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"dataset file {path}: unreadable as JSON lines ({e})") from None
    if lines == 0:
        raise DataError(f"dataset file {path} is empty")
    if record is None:
        raise DataError(
            f"dataset file {path}: records need a 'text' field (a string); none of its first {lines} has one"
        )
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
            why = _hub_unavailable(e) if files is None else None
            if why:
                flag = "--dataset" if split == "train" else "--eval_dataset"
                raise DataError(
                    f"{flag} {spec} needs the Hugging Face Hub, which is {why}: pass local files "
                    "(json/jsonl(.gz)/parquet/txt) as --dataset and --eval_dataset, e.g. the embedded quickstart "
                    f"sample: {_sample_flags('dataset', 'eval_dataset', 'tokenizer')}"
                ) from None
            raise DataError(f"cannot load dataset {spec!r} ({split}): {_first_line(e)}") from None
        ds = ds.shuffle(seed=SHUFFLE_SEED, buffer_size=1)
        ds.set_epoch(epoch)
        return ds

    load.spec, load.files = spec, files  # for messages about bad records (Documents)
    load(0)  # fail now, not at the first batch, when the source cannot be opened
    return load


def _line_of_record(path: str, record: int) -> int | None:
    """The line number of the ``record``-th non-blank line of a JSON-lines file (datasets
    skips blank lines), or None if it cannot be read. Reads only up to that line."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record -= 1
                    if record == 0:
                        return number
    except (OSError, ValueError, EOFError):
        pass
    return None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class Documents:
    """Texts of a streamed dataset in a seeded shuffled order, this rank's share of them,
    epoch after epoch (or one epoch: ``epochs=1``). ``state_dict()`` between two documents
    resumes exactly there.

    Bad records: a record whose ``text`` is missing, null or not a string is skipped, not an
    error. Large C4-like dumps sometimes hold a stray bad record, and stopping a long run
    (or refusing a file) for one of them helps nobody; silently dropping them would hide a
    broken file, so the first one gets a warning naming the file and line (for a single
    local JSON-lines file; the record's position in the stream otherwise), and the end of
    each pass over the source a warning with the count. It is still an error (DataError)
    when no usable record remains, or when the source has no ``text`` column at all."""

    def __init__(self, load, rank=0, world_size=1, epochs=None, buffer_size=BUFFER_SIZE, name="dataset"):
        self.load, self.rank, self.world_size = load, rank, world_size
        self.epochs, self.buffer_size, self.name = epochs, buffer_size, name
        self._start_epoch(0)

    def _start_epoch(self, epoch):
        self.epoch, self.index, self.kept, self.buffer = epoch, 0, 0, []
        self.read, self.skipped = 0, 0  # records of this pass read from the source, of them without text
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
            "read": self.read,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        self._start_epoch(state["epoch"])
        self.index, self.kept, self.buffer = state["index"], state["kept"], list(state["buffer"])
        self.rng.bit_generator.state = state["rng"]
        self.source_state = state["source"]
        self.read, self.skipped = state.get("read", 0), state.get("skipped", 0)  # absent in older checkpoints

    def _where(self) -> str:
        """The source as a user named it: the file, or the --dataset value."""
        spec = getattr(self.load, "spec", None)
        return f"{self.name} {spec}" if spec else self.name

    def _bad_record(self, record: int) -> str:
        """Where the ``record``-th record of this pass (1-based) is, for a message."""
        files = getattr(self.load, "files", None)
        if files and len(files) == 1 and _builder(files[0]) == "json" and not self.by_shards:
            line = _line_of_record(files[0], record)
            if line is not None:
                return f"line {line}"
        return f"record {record} of the stream"

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
                self.read += 1
                if "text" not in example:  # no such column: not a text dataset at all
                    raise DataError(f"{self._where()}: records need a 'text' field, got {sorted(example)}")
                text = example["text"]
                if not isinstance(text, str):
                    self.skipped += 1
                    if self.skipped == 1:
                        warnings.warn(
                            f"{self._where()}: {self._bad_record(self.read)} has no 'text' string "
                            f"({'null or missing' if text is None else type(text).__name__}); skipping it and any "
                            "others like it (counted at the end of the pass)",
                            stacklevel=2,
                        )
                    continue
                yield text
        except DataError:
            raise
        except Exception as e:  # a corrupt file deep in the stream
            raise DataError(f"{self._where()}: unreadable ({_first_line(e)})") from None
        if self.skipped:
            if self.skipped == self.read:
                raise DataError(f"{self._where()}: no usable records: all {self.read} lack a 'text' string")
            warnings.warn(
                f"{self._where()}: skipped {self.skipped} of {self.read} records without a 'text' string", stacklevel=2
            )

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
    document boundaries. Raises DataError for a token id >= ``vocab_size``.

    Long documents: truncate-and-pad keeps only the first L tokens, so a document longer
    than ``LONG_DOC`` x L characters is tokenized from a character prefix, not whole (a
    5 MB document would otherwise cost seconds each time it is drawn): see :meth:`_head`.
    The ids are those of the whole document. Packing uses every token of a document, so it
    tokenizes documents whole."""

    FIRST_CUT = 8  # characters per kept token in the first prefix tried (English: about 4.5)
    LONG_DOC = 32  # documents up to this many characters per kept token are tokenized whole

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

    def _head(self, text: str) -> str:
        """A prefix of ``text`` whose first ``max_length`` tokens (no special tokens) are
        those of the whole text, so that truncation gives the same ids; ``text`` itself
        when it is short or no shorter prefix is found.

        Cutting the text can change the tokens at the cut (a word split in two), so a prefix
        is trusted only when it holds at least ``max_length`` tokens and the next prefix,
        twice as long, begins with the same ``max_length`` tokens: the cut then lies beyond
        the kept tokens and moving it changes nothing there. Prefixes double from
        ``FIRST_CUT`` x L characters; the work is a few times that, whatever the document's
        length (the tokenizer's truncation keeps at most ``max_length`` minus its special
        tokens of these, and adds the special tokens as for the whole text)."""
        n = self.FIRST_CUT * self.max_length
        if len(text) <= self.LONG_DOC * self.max_length:
            return text
        previous = None  # the last prefix's first max_length ids, when it had that many
        while n < len(text):
            ids = self.tokenizer(text[:n], add_special_tokens=False)["input_ids"][: self.max_length]
            if len(ids) == self.max_length:
                if ids == previous:
                    return text[: n // 2]
                previous = ids
            n *= 2
        return text

    def _pad(self, texts):
        texts = [self._head(t) for t in texts]
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
    (EOS if it has none: pad positions are masked by the attention mask, not by id).
    A Hub name that cannot be fetched (offline, no network) nor found in the local cache, or
    a local directory that does not exist, raises a DataError pointing at the embedded
    t5-base (:func:`sample_paths`)."""
    from transformers import AutoTokenizer

    embedded = f"e.g. the embedded t5-base: {_sample_flags('tokenizer')}"
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1  # Hub ids: name or owner/name
    if looks_local and not os.path.isdir(spec):
        raise DataError(f"--tokenizer {spec}: no such directory (pass a tokenizer directory, {embedded})")
    try:
        # a huge model_max_length: packing tokenizes whole documents, which is not an error
        tok = AutoTokenizer.from_pretrained(spec, model_max_length=10**9)
    except Exception as e:
        why = None if os.path.isdir(spec) else _hub_unavailable(e)
        if why:
            raise DataError(
                f"--tokenizer {spec} needs the Hugging Face Hub, which is {why}, and is not in its local cache: "
                f"pass a local tokenizer directory, {embedded}"
            ) from None
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
