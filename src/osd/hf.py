"""Hugging Face ``transformers.Trainer`` awareness, without importing transformers.

osd imports only torch. The checks that protect a Trainer user (an osd optimizer that
Trainer built from ``optimizer_cls_and_kwargs``, :class:`osd.Layerwise` under Trainer's
gradient clipping) need to know whether a Trainer is driving the call: :func:`calling_trainer`
finds it on the Python call stack, looking only at ``transformers.trainer`` if it is already
loaded (a Trainer cannot exist otherwise).
"""

from __future__ import annotations

import sys

SEARCH_DEPTH = 8  # frames above the caller; Trainer -> AcceleratedOptimizer -> GradScaler -> ... -> osd


def calling_trainer(depth: int = SEARCH_DEPTH):
    """The ``transformers.Trainer`` (or subclass) whose method is among the ``depth`` frames
    above the caller of this function, or None."""
    trainer_module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(trainer_module, "Trainer", None)
    if trainer_cls is None:
        return None
    try:
        frame = sys._getframe(2)  # the caller's caller
    except ValueError:  # a shallower stack
        return None
    for _ in range(depth):
        if frame is None:
            return None
        if isinstance(frame.f_locals.get("self"), trainer_cls):
            return frame.f_locals["self"]
        frame = frame.f_back
    return None
