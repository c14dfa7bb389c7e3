"""Long documents in truncate-and-pad mode are tokenized from a verified character prefix:
the same ids as tokenizing the whole document, for a small fraction of the work."""

from __future__ import annotations

import gzip
import json

import pytest

from osd.data import TokenBatches, load_tokenizer, sample_paths


class CountingTokenizer:
    """A tokenizer that counts the characters it is given (the work done)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.chars += len(text) if isinstance(text, str) else sum(map(len, text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self):
        return len(self.tokenizer)


@pytest.fixture(scope="module")
def t5():
    return load_tokenizer(sample_paths()["tokenizer"])


@pytest.fixture(scope="module")
def c4_docs():
    with gzip.open(sample_paths()["dataset"], "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def whole(tokenizer, texts, max_length):
    """What TokenBatches did before the shortcut: tokenize every text whole, then truncate."""
    return tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")


def repeated(doc: str, size: int, shift: int = 0) -> str:
    return ((doc + "\n") * (size // (len(doc) + 1) + 2))[shift : size + shift]


def test_a_1mb_document_keeps_the_same_ids_for_a_fraction_of_the_work(t5, c4_docs):
    text = repeated(c4_docs[0], 1_000_000)
    counting = CountingTokenizer(t5)
    batch = TokenBatches(None, counting, 1, 256, vocab_size=32100)._pad([text])
    assert batch["input_ids"].tolist() == whole(t5, [text], 256)["input_ids"].tolist()
    # prefixes of 2,048 and 4,096 characters, then the kept 2,048 again: under 1% of the text
    assert counting.chars <= 4 * TokenBatches.FIRST_CUT * 256 < len(text) // 100


@pytest.mark.parametrize("max_length", [7, 64, 256])
def test_long_documents_keep_the_same_ids(t5, c4_docs, max_length):
    """C4 documents repeated to 40 kB, each cut at another place (mid-word, on a space, on
    punctuation), one with no space at all (one huge 'word'), one opening with a run of
    whitespace longer than the first prefixes: the ids and labels of tokenizing whole."""
    size = 40_000
    texts = [repeated(doc, size, shift) for shift, doc in enumerate(c4_docs[:12])]
    texts.append("".join(c4_docs).replace(" ", "")[:size])
    texts.append(" " * (size // 2) + repeated(c4_docs[1], size))
    counting = CountingTokenizer(t5)
    batch = TokenBatches(None, counting, len(texts), max_length, vocab_size=32100)._pad(texts)
    expected = whole(t5, texts, max_length)
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    mask = expected["attention_mask"] == 0
    assert batch["labels"].tolist() == expected["input_ids"].masked_fill(mask, -100).tolist()
    # the whitespace-led document costs at most 3 x its length; the others a few prefixes
    assert counting.chars <= 3 * len(texts[-1]) + (len(texts) - 1) * 4 * TokenBatches.FIRST_CUT * max_length


def test_short_documents_are_tokenized_whole_once(t5, c4_docs):
    counting = CountingTokenizer(t5)
    texts = c4_docs[:16]
    batch = TokenBatches(None, counting, 16, 256, vocab_size=32100)._pad(texts)
    assert counting.chars == sum(map(len, texts))
    assert batch["input_ids"].tolist() == whole(t5, texts, 256)["input_ids"].tolist()


def test_a_prefix_cut_inside_a_kept_word_is_not_trusted(t5):
    """The first prefix tried (8 x 16 = 128 characters) ends 3 letters into "informational",
    which t5 then splits as "in" "f" instead of "information" "al": that prefix holds 16
    tokens, but its 15th (the last one truncation keeps) is not the whole text's. Trusting
    the first prefix with enough tokens would give other ids; the check rejects it."""
    max_length = 16
    words = ["because"] * 10 + ["information"] * 2 + ["something", "government"]
    text = " ".join(words) + " " + "informational " * 60
    first = TokenBatches.FIRST_CUT * max_length
    assert len(text) > TokenBatches.LONG_DOC * max_length and text[first - 3 : first] == "inf"
    cut = t5(text[:first], add_special_tokens=False)["input_ids"]
    full = t5(text, add_special_tokens=False)["input_ids"]
    assert len(cut) >= max_length and cut[14] != full[14]  # the trap is set
    batch = TokenBatches(None, t5, 1, max_length, vocab_size=32100)._pad([text])
    assert batch["input_ids"].tolist() == whole(t5, [text], max_length)["input_ids"].tolist()
