"""LLaMA model sizes of the GaLore / Online Subspace Descent papers, as a table.

``model_config("llama_60m")`` or ``model_config("path/to/config.json")`` returns a
``transformers.LlamaConfig``; the trainer builds ``transformers.LlamaForCausalLM`` from it,
so checkpoints load anywhere in the Hugging Face ecosystem. This module imports
``transformers`` only inside :func:`model_config`, so the size table is usable without it
(e.g. by a memory estimator).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class LlamaSize:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    max_position_embeddings: int = 1024
    vocab_size: int = 32000


# hidden / intermediate / heads / layers, as in the seed's configs/llama_*.json (the seed's
# 100m file says vocab 32100; we keep 32000 everywhere, the t5-base ids the model may see).
SIZES: dict[str, LlamaSize] = {
    "llama_9m": LlamaSize(128, 352, 4, 4),
    "llama_20m": LlamaSize(256, 688, 4, 4),
    "llama_35m": LlamaSize(384, 1024, 8, 6),
    "llama_40m": LlamaSize(416, 1024, 8, 8),
    "llama_60m": LlamaSize(512, 1376, 8, 8),
    "llama_71m": LlamaSize(512, 1368, 8, 12),
    "llama_100m": LlamaSize(640, 1708, 10, 12),
    "llama_130m": LlamaSize(768, 2048, 12, 12),
    "llama_250m": LlamaSize(768, 2560, 16, 24),
    "llama_350m": LlamaSize(1024, 2736, 16, 24),
    "llama_1b": LlamaSize(2048, 5461, 32, 24),
    "llama_3b": LlamaSize(2560, 6848, 32, 32),
    "llama_7b": LlamaSize(4096, 11008, 32, 32, max_position_embeddings=2048),
}

# Fields shared by every size: GaLore's configs (RMSNorm eps 1e-6, untied head, t5 ids).
# No pad_token_id: the seed's files say -1, which HF would turn into a frozen padding row;
# pad positions are excluded from the loss instead.
COMMON = dict(
    rms_norm_eps=1e-6,
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
    use_cache=False,
)

# Fields that decide whether a checkpoint's weights belong to a config.
ARCHITECTURE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
    "tie_word_embeddings",
)


def resolve(spec: str) -> dict:
    """LlamaConfig keyword arguments for a size name (``llama_60m``), a JSON config file, or
    a model directory holding ``config.json``. A missing path whose stem is a size name
    (the seed's ``configs/llama_60m.json``) falls back to the table, so seed command lines
    work unchanged. Raises ValueError for anything else."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"model config {spec}: not a readable JSON file ({e})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"model config {spec}: expected a JSON object")
        # GaLore's files name the context length max_sequence_length and pad -1.
        if "max_sequence_length" in fields:
            fields.setdefault("max_position_embeddings", fields.pop("max_sequence_length"))
        if fields.get("pad_token_id", 0) is not None and fields.get("pad_token_id", 0) < 0:
            fields["pad_token_id"] = None
        for key in ("architectures", "model_type", "transformers_version"):
            fields.pop(key, None)
        return {**COMMON, **fields}
    name = path.name.removesuffix(".json")
    if name in SIZES:
        return {**COMMON, **asdict(SIZES[name])}
    raise ValueError(f"unknown model config {spec!r}: not a file, and not one of {', '.join(SIZES)}")


def model_config(spec: str):
    """``transformers.LlamaConfig`` for :func:`resolve`'s ``spec``."""
    from transformers import LlamaConfig

    return LlamaConfig(**resolve(spec))


def build_model(spec: str, dtype=None, device=None):
    """``transformers.LlamaForCausalLM`` for :func:`resolve`'s ``spec``, created directly in
    ``dtype`` on ``device`` (no fp32 copy on the host first: what the benchmarks measure),
    with :mod:`osd.lean`'s RMSNorm and SwiGLU (as the trainer's)."""
    import torch
    from transformers import LlamaForCausalLM

    from osd import lean

    config = model_config(spec)
    default = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = LlamaForCausalLM(config)
        lean.apply(model)
        return model
    finally:
        torch.set_default_dtype(default)


def checkpoint_layers(model) -> None:
    """Activation checkpointing of each decoder layer, as ``osd-train
    --activation_checkpointing`` does it (non-reentrant: works with per-layer hooks and
    FSDP2): transformers' newer name for it where it exists, else its older one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    enable() if enable else model.gradient_checkpointing_enable({"use_reentrant": False})


def architecture(config) -> dict:
    """The fields of a LlamaConfig (or its dict) that must match to load weights."""
    fields = config if isinstance(config, dict) else config.to_dict()
    return {k: fields.get(k) for k in ARCHITECTURE_KEYS}
