"""How optimizer state tensors are stored: full precision, or 8-bit block-wise.

8-bit state is a storage choice, not a new algorithm: rules (:mod:`osd.rules`) allocate
their moments through a storage object and read/write them with ``load``/``store``. State
lives in plain dicts of plain tensors, keyed by name, one dict per parameter (stacked by
the engine for a step, see :mod:`osd.engine`):

* full precision: ``KEY`` is the moment itself;
* 8-bit (:class:`Blockwise8bit`): ``KEY`` holds the uint8 codes (the moment's shape),
  ``KEY.scale`` one fp32 absmax per block of 256 values, ``KEY.signed`` a bool. The codes
  index torchao's dynamic-tree quantisation map (Dettmers et al. 2022), rounded to the
  nearest map entry as torchao's quantiser does (:func:`quantize`), on whole stacks at once.
  torchao is imported only when 8-bit storage is used.

This layout is also what ``state_dict()`` holds, so checkpoints load with
``torch.load(weights_only=True)`` without torchao, and checkpoints written by earlier
versions of this project (which used this layout on disk) load unchanged.
"""

from __future__ import annotations

import torch

SCALE, SIGNED = ".scale", ".signed"


class Storage:
    """Full-precision storage: state tensors are ordinary tensors updated in place."""

    def zeros(self, key, shape, device, signed: bool, dtype=torch.float32) -> dict:
        """State entries for a zero moment ``key`` of stacked ``shape`` (k, *tensor_shape)."""
        return {key: torch.zeros(shape, device=device, dtype=dtype)}

    def load(self, state: dict, key: str) -> torch.Tensor:
        """The moment as a tensor; in-place changes to it are kept only after :meth:`store`."""
        return state[key]

    def store(self, state: dict, key: str, value: torch.Tensor) -> None:
        if value is not state[key]:
            state[key].copy_(value)


FP32 = Storage()


def _torchao_quant_utils():
    try:
        from torchao.optim import quant_utils
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("8-bit optimizer state needs torchao: pip install 'online-subspace-descent[eightbit]'") from e
    return quant_utils


_QMAPS: dict = {}


def _qmap(signed: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's dynamic quantisation map (256 sorted values) and the midpoints between
    neighbours, on ``device``."""
    key = (bool(signed), str(device))
    if key not in _QMAPS:
        values = torch.tensor(_torchao_quant_utils().create_dynamic_map(signed=bool(signed)), dtype=torch.float32)
        _QMAPS[key] = (values.to(device), ((values[1:] + values[:-1]) / 2).to(device))
    return _QMAPS[key]


def quantize(normalised: torch.Tensor, signed: bool) -> torch.Tensor:
    """Codes of values in [-1, 1]: the nearest entry of torchao's map (ties up, as
    ``torchao.optim.quant_utils.quantize_8bit_with_qmap``), as ONE binary-search op
    (``torch.bucketize``) instead of torchao's eager 8-step search (about 30 ops). Same
    codes but where float rounding puts a value exactly on a midpoint (tests: 1 in 4M);
    4.4x faster on the CPU (README, "8-bit state")."""
    return torch.bucketize(normalised, _qmap(signed, normalised.device)[1], out_int32=True, right=True)


class Blockwise8bit(Storage):
    """8-bit block-wise quantised state (torchao's map and quantiser). Tensors smaller than
    ``min_numel`` or whose size is not a multiple of ``block_size`` stay in fp32 (as
    torchao does): their memory is negligible and quantising them costs accuracy for nothing.
    A stack is quantised and dequantised in one pass: blocks never straddle two tensors."""

    def __init__(self, block_size: int = 256, min_numel: int = 4096):
        self.block_size = block_size
        self.min_numel = min_numel

    def zeros(self, key, shape, device, signed: bool, dtype=torch.float32):
        shape = tuple(shape)
        numel = torch.Size(shape[1:]).numel()
        if numel < self.min_numel or numel % self.block_size:
            return super().zeros(key, shape, device, signed, dtype)
        _qmap(signed, device)  # built (and torchao imported) here, never inside a steady-state step
        return {
            key: torch.zeros(shape, dtype=torch.uint8, device=device),
            key + SCALE: torch.zeros(shape[0], numel // self.block_size, device=device),
            key + SIGNED: bool(signed),
        }

    def load(self, state, key):
        if key + SCALE not in state:
            return state[key]
        codes, scale = state[key], state[key + SCALE]
        qmap = _qmap(state[key + SIGNED], codes.device)[0]
        return (qmap[codes.int()].view(scale.shape + (-1,)) * scale.unsqueeze(-1)).view(codes.shape)

    def store(self, state, key, value):
        if key + SCALE not in state:
            return super().store(state, key, value)
        codes, scale = state[key], state[key + SCALE]
        blocks = value.reshape(-1, self.block_size)
        block_scale = blocks.abs().amax(-1).clip(1e-12)  # as torchao.optim.quant_utils.scale_tensor
        codes.copy_(quantize((blocks / block_scale.unsqueeze(-1)).view(codes.shape), state[key + SIGNED]))
        scale.copy_(block_scale.view(scale.shape))


EIGHT_BIT = Blockwise8bit()


def is_quantized(state: dict, key: str) -> bool:
    """Whether the moment ``key`` of a parameter's state is stored in 8 bits."""
    return key + SCALE in state


def tensors(state: dict) -> dict:
    """The tensor entries of a state dict."""
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def nbytes(state: dict) -> int:
    """Bytes held by a parameter's state (codes and scales for 8-bit moments)."""
    return sum(v.nbytes for v in tensors(state).values())


def unpack(state: dict, device) -> dict:
    """A loaded parameter state on ``device``, dtypes unchanged."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}
