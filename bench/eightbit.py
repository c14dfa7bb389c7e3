"""8-bit optimizer state: how fast is one 8-bit Adam update of a large tensor, per backend?

Candidates, on ``--numel`` values (default 4M, an embedding of 32000 x 128) in ``--stack``
same-shape tensors (one stack), block size 256, both moments 8-bit:

* ``osd``: ``osd.AdamW8bit``'s step (a plain group; dequantise, Adam, requantise with
  torchao's map and codes): the fused update compiled with dynamic shapes (the default; first
  step includes the compilation), the same compiled with static shapes, compiled quantiser
  and dequantiser around an eager Adam
  (``Blockwise8bit(fused=False)``), and all eager;
* ``torchao eager``: the same update with torchao's own eager quantiser
  (``torchao.optim.quant_utils.quantize_8bit_with_qmap``, an 8-step binary search);
* ``torchao compiled``: that update under ``torch.compile(fullgraph=True, dynamic=False)``, as
  ``torchao.optim.AdamW8bit`` runs it (``--compile``; compile time reported);
* ``bitsandbytes``: ``bitsandbytes.optim.AdamW8bit`` (if installed; its fused block-wise
  kernel also updates the weights, so it cannot serve a subspace group, whose update is
  projected back before it reaches the weights).
* ``fp32 fused``: ``torch.optim.AdamW(fused=True)`` with fp32 state (reference).

Prints a markdown table of ms per update (median of ``--repeats``).

    .venv/bin/python bench/eightbit.py [--compile] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import osd


def timed(fn, device, repeats):
    fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return statistics.median(out) * 1e3


def torchao_update(quant_utils, qmaps):
    def dequant(codes, scale, qmap):
        return quant_utils.dequant_with_qmap(codes, qmap, scale)

    def quant(x, codes, scale, qmap):
        scaled, s = quant_utils.scale_tensor(x, 256)
        codes.copy_(quant_utils.quantize_8bit_with_qmap(scaled, qmap))
        scale.copy_(s)

    def update(p, g, c1, s1, c2, s2, lr, bc1, bc2):
        m, v = dequant(c1, s1, qmaps[0]), dequant(c2, s2, qmaps[1])
        m.lerp_(g, 0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        quant(m, c1, s1, qmaps[0])
        quant(v, c2, s2, qmaps[1])
        p.sub_((m / (v.sqrt() / bc2.sqrt()).add_(1e-8)) * (lr / bc1))

    return update


def _tensor_scalars(fn):
    def call(rule, g, moments, lr, step, block_size):
        return fn(rule, g, moments, torch.tensor(float(lr)), torch.tensor(float(step)), block_size)

    return call


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__)
    p.add_argument("--numel", type=int, default=4096 * 1024)
    p.add_argument("--stack", type=int, default=1, help="split the values into this many same-shape tensors")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also time torchao's update under torch.compile")
    args = p.parse_args(argv)
    from torchao.optim import quant_utils

    device, n = args.device, args.numel
    rows = []

    def param():
        w = torch.nn.Parameter(torch.randn(n, device=device) * 0.02)
        w.grad = torch.randn(n, device=device) * 1e-3
        return w

    stack = [torch.nn.Parameter(torch.randn(n // args.stack, device=device) * 0.02) for _ in range(args.stack)]
    for w in stack:
        w.grad = torch.randn_like(w) * 1e-3
    opt = torch.optim.AdamW(stack, lr=1e-3, weight_decay=0.0, fused=True)
    rows.append(("fp32 fused (torch.optim.AdamW(fused=True))", timed(opt.step, device, args.repeats), ""))
    storage = osd.storage
    default = (storage.EIGHT_BIT.compile, storage.EIGHT_BIT.fused)
    variants = [
        ("osd.AdamW8bit, fused compiled update (default)", True, True, None),
        ("osd.AdamW8bit, compiled quantiser and dequantiser, eager Adam", True, False, None),
        ("osd.AdamW8bit, fused update compiled with static shapes, lr and step 0-d CPU tensors", True, True, "static"),
        ("osd.AdamW8bit, eager", False, False, None),
    ]
    for name, compiled, fused, variant in variants:
        storage.EIGHT_BIT.compile, storage.EIGHT_BIT.fused = compiled, fused
        storage._KERNELS.clear()
        if variant:
            eager = (storage._dequantize, storage._quantize)
            fn = torch.compile(storage._fused_update, dynamic=variant != "static")
            if variant == "static":  # the step and lr as 0-d CPU tensors, so they are not constants
                fn = _tensor_scalars(fn)
            storage._KERNELS["compiled"] = (*(torch.compile(f, dynamic=True) for f in eager), fn)
        opt = osd.AdamW8bit([{"params": stack, "max_stack_bytes": 2**40}], lr=1e-3, weight_decay=0.0)
        start = time.perf_counter()
        opt.step()
        first = time.perf_counter() - start
        rows.append((name, timed(opt.step, device, args.repeats), f"first step {first:.0f} s" if compiled else ""))
    storage.EIGHT_BIT.compile, storage.EIGHT_BIT.fused = default
    storage._KERNELS.clear()
    w = param()

    qmaps = [torch.tensor(quant_utils.create_dynamic_map(signed=s), device=device) for s in (True, False)]
    update = torchao_update(quant_utils, qmaps)
    w = param()
    state = [torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(n // 256, device=device)] * 2
    scalars = [torch.tensor(x, device=device) for x in (1e-3, 0.1, 0.01)]
    with torch.no_grad():
        rows.append(
            (
                "torchao eager (quantize_8bit_with_qmap)",
                timed(lambda: update(w, w.grad, *state, *scalars), device, max(1, args.repeats // 2)),
                "",
            )
        )
        if args.compile:
            compiled = torch.compile(update, fullgraph=True, dynamic=False)
            start = time.perf_counter()
            compiled(w, w.grad, *state, *scalars)
            compile_s = time.perf_counter() - start
            rows.append(
                (
                    "torchao compiled (torch.compile, as torchao.optim.AdamW8bit)",
                    timed(lambda: compiled(w, w.grad, *state, *scalars), device, args.repeats),
                    f"compile {compile_s:.0f} s per tensor shape",
                )
            )
    try:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(stack, lr=1e-3, weight_decay=0.0, min_8bit_size=4096)
        rows.append((f"bitsandbytes {bnb.__version__} AdamW8bit", timed(opt.step, device, args.repeats), ""))
    except Exception as e:  # noqa: BLE001 - not installed, or no kernels for this device
        rows.append(("bitsandbytes AdamW8bit", float("nan"), f"{type(e).__name__}: {str(e)[:80]}"))

    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"one Adam update of {n:,} values, 8-bit moments (block 256); {where}, torch {torch.__version__}\n")
    print("| backend | ms per update | note |\n|---|---:|---|")
    for name, ms, note in rows:
        print(f"| {name} | {ms:.1f} | {note} |")


if __name__ == "__main__":
    main()
