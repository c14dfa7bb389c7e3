"""How optimizer state tensors are stored: full precision, or 8-bit block-wise.

8-bit state is a storage choice, not a new algorithm: rules (:mod:`osd.rules`) allocate
their moments through a storage object and read/write them with ``load``/``store``. State
lives in plain dicts of plain tensors, keyed by name, one dict per parameter (stacked by
the engine for a step, see :mod:`osd.engine`):

* full precision: ``KEY`` is the moment itself;
* 8-bit (:class:`Blockwise8bit`): ``KEY`` holds the uint8 codes (the moment's shape),
  ``KEY.scale`` one fp32 absmax per block of 256 values, ``KEY.signed`` a bool. The codes
  index torchao's dynamic-tree quantisation map (Dettmers et al. 2022) and are torchao's
  codes exactly (its quantiser rounds to the nearest map entry, ties up), computed on whole
  stacks at once from the map's exact rounding thresholds (:func:`_thresholds`): eagerly by
  one ``torch.bucketize`` (torchao's eager 8-step search dispatches about 40 ops), compiled
  by that search (:func:`_codes`). torchao is imported only when 8-bit storage is used (for
  its map).

This layout is also what ``state_dict()`` holds, so checkpoints load with
``torch.load(weights_only=True)`` without torchao, and checkpoints written by earlier
versions of this project (which used this layout on disk) load unchanged.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from osd.shards import WHOLE, Whole

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

    def update(
        self, rule, g: torch.Tensor, state: dict, lr: float, step: int, shard: Whole = WHOLE, keep=None
    ) -> torch.Tensor:
        """``rule.update`` of the stack ``g`` with its state in this storage (the state's dtype);
        ``shard``: the layout of ``g``'s rows (:mod:`osd.shards`), for rules that reduce over them.
        ``keep``: None, or a (k,) bool tensor of the matrices whose state must not change (the
        rule runs on a scratch copy, written back where ``keep`` is False; their update is
        returned all the same, for the caller to discard)."""
        if keep is None:
            return rule.update(g, state, lr, step, self, shard)
        scratch = self._scratch(state)
        delta = rule.update(g, scratch, lr, step, self, shard)
        for key, value in state.items():
            if torch.is_tensor(value):
                torch.where(keep.view((-1,) + (1,) * (value.dim() - 1)), value, scratch[key], out=value)
        return delta

    def _scratch(self, state: dict) -> dict:
        """A copy of ``state`` that a rule may change in place."""
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


FP32 = Storage()


def _torchao_quant_utils():
    try:
        from torchao.optim import quant_utils
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("8-bit optimizer state needs torchao: pip install 'online-subspace-descent[eightbit]'") from e
    return quant_utils


_QMAPS: dict = {}


def _qmap(signed: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(torchao's dynamic quantisation map: 256 sorted values, its 255 :func:`_thresholds`
    and +inf) on ``device``."""
    key = (bool(signed), str(device))
    if key not in _QMAPS:
        values = torch.tensor(_torchao_quant_utils().create_dynamic_map(signed=bool(signed)), dtype=torch.float32)
        padded = torch.cat([_thresholds(values), torch.tensor([float("inf")])])
        _QMAPS[key] = (values.to(device), padded.to(device))
    return _QMAPS[key]


def _thresholds(qmap: torch.Tensor) -> torch.Tensor:
    """The 255 fp32 numbers ``t_i``: the smallest x that torchao's quantiser rounds up from
    ``qmap[i]`` to ``qmap[i + 1]`` (``x - qmap[i] >= (qmap[i + 1] - qmap[i]) * 0.5`` in fp32).
    Its code of an x in [qmap[0], 1] is then the number of thresholds <= x,
    ``torch.bucketize(x, thresholds, right=True)``: the same codes, one op."""
    low, half = qmap[:-1], (qmap[1:] - qmap[:-1]) * 0.5
    t = low + half
    for _ in range(8):  # rounding of low + half: at most a few ulps either way
        up = (t - low) < half
        t = torch.where(up, torch.nextafter(t, torch.tensor(float("inf"))), t)
        lower = torch.nextafter(t, torch.tensor(float("-inf")))
        t = torch.where(~up & ((lower - low) >= half), lower, t)
    return t


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Flat codes and block scales -> flat fp32 values."""
    return (qmap[codes.int()].view(scale.shape[0], -1) * scale.unsqueeze(-1)).view(-1)


def _quantize(value: torch.Tensor, thresholds: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 values -> flat int32 codes (torchao's: the nearest map entry of
    value/absmax, ties up; :func:`_thresholds`) and one absmax per block."""
    blocks = value.view(-1, block_size)
    scale = torch.linalg.vector_norm(blocks, float("inf"), -1).clamp_(min=1e-12)  # as torchao's scale_tensor
    return _codes((blocks / scale.unsqueeze(-1)).view(-1), thresholds), scale


def _codes(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The number of thresholds <= x (int32): torchao's code of x (``thresholds``: the 255 of
    :func:`_thresholds` and +inf). Eager, one ``torch.bucketize``; compiled, a branchless
    8-step binary search (torchao's own form), which inductor fuses and vectorises where its
    ``bucketize`` is 2.5x slower on a CPU (4M values: 35-42 against 93-106 ms)."""
    if not torch.compiler.is_compiling():
        return torch.bucketize(x, thresholds[:-1], out_int32=True, right=True)
    codes = torch.zeros_like(x, dtype=torch.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        codes += torch.where(x >= thresholds[codes + (step - 1)], step, 0).int()
    return codes


def _fused_update(rule, g: torch.Tensor, moments: dict, lr, step, block_size: int) -> torch.Tensor:
    """An elementwise rule's update of flat gradients ``g`` whose moments are 8-bit:
    ``moments`` maps each moment's name to its flat (codes, scales, map, thresholds), which
    are dequantised, updated by ``rule`` in fp32 and requantised in place. Returns the update
    in ``g``'s dtype. Compiled, this is one pass over the state (no fp32 moment in memory)."""
    values = {key: _dequantize(codes, scale, qmap) for key, (codes, scale, qmap, _) in moments.items()}
    delta = rule.update(g.float(), values, lr, step, FP32)
    for key, (codes, scale, _, thresholds) in moments.items():
        new_codes, new_scale = _quantize(values[key], thresholds, block_size)
        codes.copy_(new_codes)
        scale.copy_(new_scale)
    return delta.to(g.dtype)


_KERNELS: dict = {}


def _eager(tensor: torch.Tensor, compile: bool) -> bool:
    """Whether 8-bit kernels run eagerly: on the meta device, under a dispatch mode (op
    counting), when asked, or when compilation failed once (with a warning)."""
    return (
        not compile
        or tensor.device.type == "meta"
        or _get_current_dispatch_mode() is not None
        or _KERNELS.get("compiled", True) is None
    )


def _kernels(tensor: torch.Tensor, compile: bool):
    """(dequantize, quantize, fused update): compiled once with dynamic shapes (one graph for
    every stack shape; the fused update one per rule), or eager (:func:`_eager`)."""
    if _eager(tensor, compile):
        return _dequantize, _quantize, _fused_update
    if "compiled" not in _KERNELS:
        _KERNELS["compiled"] = tuple(torch.compile(f, dynamic=True) for f in (_dequantize, _quantize, _fused_update))
    return _KERNELS["compiled"]


def _no_duck_shapes():
    from torch.fx.experimental import _config

    return _config.patch(use_duck_shape=False)


def _compile_failed(error: Exception) -> None:
    warnings.warn(f"8-bit state: torch.compile failed ({type(error).__name__}: {error}); running eagerly", stacklevel=3)
    _KERNELS["compiled"] = None


class Blockwise8bit(Storage):
    """8-bit block-wise quantised state (torchao's map and quantiser). Tensors smaller than
    ``min_numel`` or whose size is not a multiple of ``block_size`` stay in fp32 (as
    torchao does): their memory is negligible and quantising them costs accuracy for nothing.
    A stack is quantised and dequantised in one pass: blocks never straddle two tensors.

    ``compile=True`` (the default) runs the 8-bit kernels under ``torch.compile`` with
    dynamic shapes (one graph for all stack shapes, compiled on first use: 5-20 s).
    ``fused`` picks which kernels: the whole update of an elementwise rule in one compiled
    function (``True``), or a compiled dequantiser and quantiser around the rule's eager
    arithmetic (``False``). ``None`` (the default) fuses on CUDA only, as measured by
    ``bench/eightbit.py`` (one Adam update of 64M values in 16 tensors): 4.1 against 4.6 ms
    on an H100; 1M values in 4 tensors on a 2-core CPU: 87 against 26 ms. Both are far from
    torchao's own compiled update of one flat tensor with static shapes (0.9 ms on the H100)
    and from bitsandbytes' kernel (2.7 ms): README, "8-bit state"."""

    def __init__(self, block_size: int = 256, min_numel: int = 4096, compile: bool = True, fused: bool | None = None):
        self.block_size = block_size
        self.min_numel = min_numel
        self.compile = compile
        self.fused = fused

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

    def update(self, rule, g, state, lr, step, shard: Whole = WHOLE, keep=None):
        """``rule.update`` with 8-bit moments. When fused (see the class), an elementwise
        rule's moments (Adam, Lion) are dequantised, updated and requantised by one compiled
        function (:func:`_fused_update`); other rules (Adafactor), unfused and eager runs,
        and masked updates (``keep``, see :meth:`Storage.update`) use :meth:`load` /
        :meth:`store` around the rule."""
        quantized = [k for k in state if k + SCALE in state]
        fused = self.fused if self.fused is not None else g.is_cuda
        if (
            keep is not None
            or not (quantized and fused and getattr(rule, "elementwise", False))
            or _eager(g, self.compile)
        ):
            return super().update(rule, g.float(), state, lr, step, shard, keep)
        flat = {
            k: (state[k].view(-1).detach(), state[k + SCALE].view(-1).detach(), *_qmap(state[k + SIGNED], g.device))
            for k in quantized
        }
        kernel = _kernels(g, self.compile)[2]
        try:
            # without duck sizing, equal sizes (a scale count of 256, the map's 256) are not
            # tied together by guards, so one graph serves every stack shape
            with _no_duck_shapes():
                delta = kernel(rule, g.reshape(-1).detach(), flat, lr, step, self.block_size)
        except Exception as e:  # noqa: BLE001 - a compiler failure: fall back to eager
            _compile_failed(e)
            return rule.update(g.float(), state, lr, step, self, shard)
        return delta.view(g.shape)

    def _scratch(self, state):
        # 8-bit moments need no copy: load dequantises into a new tensor, and store puts the
        # new codes and scales in the scratch dict instead of writing them over the old ones
        scratch = _Scratch(state)
        for k, v in state.items():
            if torch.is_tensor(v) and k + SCALE not in state and not k.endswith(SCALE):
                scratch[k] = v.clone()
        return scratch

    def load(self, state, key):
        if key + SCALE not in state:
            return state[key]
        codes, scale = state[key], state[key + SCALE]
        qmap, _ = _qmap(state[key + SIGNED], codes.device)
        dequantize = _kernels(codes, self.compile)[0]
        try:
            with _no_duck_shapes():
                flat = dequantize(codes.view(-1).detach(), scale.view(-1).detach(), qmap)
        except Exception as e:  # noqa: BLE001 - a compiler failure: fall back to eager
            if dequantize is _dequantize:
                raise
            _compile_failed(e)
            flat = _dequantize(codes.view(-1), scale.view(-1), qmap)
        return flat.view(codes.shape)

    def store(self, state, key, value):
        if key + SCALE not in state:
            return super().store(state, key, value)
        codes, scale = state[key], state[key + SCALE]
        _, thresholds = _qmap(state[key + SIGNED], codes.device)
        quantize = _kernels(codes, self.compile)[1]
        try:
            with _no_duck_shapes():
                new_codes, new_scale = quantize(value.reshape(-1).detach(), thresholds, self.block_size)
        except Exception as e:  # noqa: BLE001 - a compiler failure: fall back to eager
            if quantize is _quantize:
                raise
            _compile_failed(e)
            new_codes, new_scale = _quantize(value.reshape(-1), thresholds, self.block_size)
        if isinstance(state, _Scratch):
            state[key], state[key + SCALE] = new_codes.to(codes.dtype).view(codes.shape), new_scale.view(scale.shape)
            return
        codes.view(-1).copy_(new_codes)
        scale.view(-1).copy_(new_scale)


class _Scratch(dict):
    """The scratch state of a masked 8-bit update (:meth:`Blockwise8bit._scratch`)."""


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
