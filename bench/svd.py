"""Time of the SVD behind the bases, exact against randomized (``svd_method``), one matrix
of each LLaMA shape and the GaLore paper's rank, on the device given:

    python bench/svd.py                    # CPU: llama_1b's MLP shape and llama_7b's (minutes)
    python bench/svd.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from osd import projectors

SHAPES = [(2048, 5461, 512), (4096, 11008, 1024)]  # llama_1b and llama_7b MLP matrices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print("| shape | rank | exact s | randomized s | exact / randomized |\n|---|---:|---:|---:|---:|")
    for m, n, r in SHAPES:
        g = torch.randn(1, m, n, generator=torch.Generator().manual_seed(0)).to(args.device)
        times = {}
        for method in ("randomized", "exact"):
            sync()
            start = time.perf_counter()
            projectors._svd_bases(g, r, True, False, method)
            sync()
            times[method] = time.perf_counter() - start
        print(
            f"| {m}x{n} | {r} | {times['exact']:.1f} | {times['randomized']:.1f} | {times['exact'] / times['randomized']:.1f}x |"
        )


if __name__ == "__main__":
    main()
