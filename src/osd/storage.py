"""How optimizer state tensors are stored: full precision, or 8-bit block-wise.

8-bit state is a storage choice, not a new algorithm: rules (:mod:`osd.rules`) allocate
their moments through a storage object and read/write them with ``load``/``store``. The
8-bit backend is torchao's ``OptimState8bit`` (dynamic-tree quantisation map, one fp32
scale per block of 256 values, Dettmers et al. 2022); it runs on CPU and CUDA. torchao is
imported only when 8-bit storage is used.

In ``state_dict()`` an 8-bit tensor is written as plain tensors (``KEY`` = uint8 codes,
``KEY.scale`` = fp32 block scales, ``KEY.signed`` = bool) so that checkpoints load with
``torch.load(weights_only=True)`` even where torchao is not imported.
"""

from __future__ import annotations

import torch


class Storage:
    """Full-precision storage: state tensors are ordinary tensors updated in place."""

    def zeros(self, shape, device, signed: bool, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(shape, device=device, dtype=dtype)

    def load(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def store(self, t: torch.Tensor, value: torch.Tensor) -> None:
        if value is not t:
            t.copy_(value)


FP32 = Storage()


def _optim_state_8bit():
    try:
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("8-bit optimizer state needs torchao: pip install 'online-subspace-descent[eightbit]'") from e
    return OptimState8bit


class Blockwise8bit(Storage):
    """8-bit block-wise quantised state via torchao. Tensors smaller than ``min_numel`` or
    whose size is not a multiple of ``block_size`` stay in fp32 (as torchao does): their
    memory is negligible and quantising them costs accuracy for nothing."""

    def __init__(self, block_size: int = 256, min_numel: int = 4096):
        self.block_size = block_size
        self.min_numel = min_numel

    def zeros(self, shape, device, signed: bool, dtype=torch.float32):
        numel = torch.Size(shape).numel()
        if numel < self.min_numel or numel % self.block_size:
            return super().zeros(shape, device, signed, dtype)
        return _optim_state_8bit().zeros(shape, signed=signed, block_size=self.block_size, device=device)

    def load(self, t):
        return t.dequantize() if is_quantized(t) else t


EIGHT_BIT = Blockwise8bit()


def is_quantized(t) -> bool:
    return hasattr(t, "codes") and hasattr(t, "qmap") and hasattr(t, "dequantize")


def nbytes(t: torch.Tensor) -> int:
    """Bytes really held by a state tensor (codes and scales for 8-bit ones)."""
    if is_quantized(t):
        return t.codes.nbytes + t.scale.nbytes
    return t.nbytes


def pack(state: dict) -> dict:
    """Param state -> plain tensors and Python scalars (for ``state_dict``)."""
    out = {}
    for key, value in state.items():
        if is_quantized(value):
            out[key] = value.codes
            out[key + ".scale"] = value.scale
            out[key + ".signed"] = bool(value.signed)
        else:
            out[key] = value
    return out


def unpack(state: dict, device) -> dict:
    """Inverse of :func:`pack`, moving tensors to ``device`` without changing their dtype."""
    out = {}
    for key, value in state.items():
        if key.endswith((".scale", ".signed")) and key.rsplit(".", 1)[0] in state:
            continue
        if torch.is_tensor(value):
            value = value.to(device)
        if key + ".scale" in state:
            signed, scale = state[key + ".signed"], state[key + ".scale"]
            block_size = value.numel() // scale.numel()
            value = _optim_state_8bit().zeros(value.shape, signed=signed, block_size=block_size, device=device)
            value.codes.copy_(state[key].to(device))
            value.scale.copy_(state[key + ".scale"].to(device))
        out[key] = value
    return out
