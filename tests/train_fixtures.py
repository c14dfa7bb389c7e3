"""Small generated data for the trainer tests: a word-level tokenizer, C4-schema JSON-lines
documents and a 2-layer LLaMA config, so the tests need neither the Hub nor ../shared/data."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from osd.train import flags_to_argv

WORDS = (
    "the a cat dog bird sat ran flew on under over mat log tree and then it was red blue green "
    "small big very quite house garden river fast slow today yesterday morning night saw heard"
).split()
SPECIAL = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: t5's pad and eos ids
SHARED_DATA = Path(__file__).resolve().parents[1] / "../shared/data"

TINY_MODEL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_hidden_layers=2,
    vocab_size=64,
    max_position_embeddings=64,
)


def make_tokenizer(directory: Path, words=WORDS) -> Path:
    """A word-level tokenizer (whitespace split, EOS appended) saved as a HF tokenizer dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return directory


def make_docs(path: Path, n: int, seed: int) -> Path:
    """C4-schema JSON lines; sentences follow a simple grammar so a model can learn them,
    and lengths vary so padding differs between batches."""
    rng = random.Random(seed)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for i in range(n):
            sentences = []
            for _ in range(rng.randint(1, 8)):
                subject = rng.choice(["cat", "dog", "bird"])
                verb = {"cat": "sat", "dog": "ran", "bird": "flew"}[subject]
                where = rng.choice(["on", "under", "over"])
                thing = rng.choice(["mat", "log", "tree", "house", "river"])
                sentences.append(f"the {subject} {verb} {where} the {rng.choice(['small', 'big'])} {thing}")
            record = {"text": " and then ".join(sentences), "timestamp": "2019-04-25 12:00:00", "url": f"u{i}"}
            f.write(json.dumps(record) + "\n")
    return path


def make_fixture(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    model = root / "tiny_llama.json"
    model.write_text(json.dumps(TINY_MODEL))
    return {
        "tokenizer": str(make_tokenizer(root / "tokenizer")),
        "train": str(make_docs(root / "train.jsonl.gz", 600, seed=0)),
        "eval": str(make_docs(root / "validation.jsonl", 60, seed=1)),
        "model": str(model),
    }


def base_args(fx: dict, save_dir, **overrides) -> list[str]:
    """Command line of a small, fast run on the fixture; ``overrides`` replace flags
    (True adds a bare flag, None drops it)."""
    flags = dict(
        model_config=fx["model"],
        dataset=fx["train"],
        eval_dataset=fx["eval"],
        tokenizer=fx["tokenizer"],
        optimizer="galore_adamw",
        proj_type="continuous",
        rank=8,
        update_proj_gap=10,
        galore_scale=0.25,
        lr=0.01,
        batch_size=4,
        max_length=32,
        num_training_steps=8,
        warmup_steps=2,
        eval_every=4,
        save_every=4,
        eval_tokens=400,
        dtype="float32",
        save_dir=str(save_dir),
    )
    flags.update(overrides)
    return flags_to_argv(flags)


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]
