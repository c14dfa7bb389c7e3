"""Tiny GLUE fixtures: a generated glue_data/ layout (each task's real columns, CoLA without
a header, MRPC with its BOM, RTE/STS-B with bare quotes) and a tiny BERT model directory."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = "good bad great awful fine poor nice dull the a movie film plot actor is was very not".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


def write_glue(root: Path, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> Path:
    """``root/glue_data`` with CoLA, SST-2, MRPC, RTE and STS-B train.tsv/dev.tsv files. The
    label is learnable: 1 when the sentence has "good" (SST-2, CoLA), and so on."""
    rng = random.Random(seed)
    data = root / "glue_data"
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = {task: [] for task in ("CoLA", "SST-2", "MRPC", "RTE", "STS-B")}
        for i in range(n):
            s1, s2 = _sentence(rng), _sentence(rng)
            good = int("good" in s1.split())
            rows["CoLA"].append(f"src{i}\t{good}\t\t{s1}")
            rows["SST-2"].append(f"{s1} \t{good}")
            rows["MRPC"].append(f'{good}\t{i}\t{i + 1}\t{s1}\t" {s2}')
            label = "entailment" if good else "not_entailment"
            rows["RTE"].append(f'{i}\t"{s1}\t{s2}\t{label}')
            rows["STS-B"].append(
                f"{i}\tmain\tfile\t2012\t{i:04d}\tnone\tnone\t{s1}\t{s2}\t{4.0 * good + rng.random():.3f}"
            )
        headers = {
            "CoLA": None,
            "SST-2": "sentence\tlabel",
            "MRPC": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            "RTE": "index\tsentence1\tsentence2\tlabel",
            "STS-B": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        }
        for task, lines in rows.items():
            (data / task).mkdir(parents=True, exist_ok=True)
            text = ([headers[task]] if headers[task] else []) + lines
            (data / task / f"{split}.tsv").write_text("\n".join(text) + "\n", encoding="utf-8")
    return data


def write_model(root: Path, model_type: str = "bert") -> Path:
    """A tiny randomly initialised BERT (or RoBERTa) with a WordPiece tokenizer over WORDS."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory = root / f"tiny-{model_type}"
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=160,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory
