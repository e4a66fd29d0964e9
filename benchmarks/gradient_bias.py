"""Which DIVISION gradients are unbiased, and how biased the others are.

    python benchmarks/gradient_bias.py --out logs/bench/gradient_bias

Stochastic rounding makes the reconstruction unbiased (E[x_hat] = x up to 2^-17 of a step), so a
gradient linear in the saved input is unbiased too: Conv's and Linear's weight gradients,
BatchNorm's weight gradient. BatchNorm's input gradient is not linear in it: it holds
sum_j gy_j (x_j - mean) * (x_i - mean), whose j = i term picks up the variance of the rounding
noise, a bias of order step^2 / (elements per channel * variance) that shrinks as channels get more
elements. For each case this averages --draws independent DIVISION gradients on a fixed random
input and upstream gradient and reports |mean - exact| / |exact| next to the noise floor of that
mean (the single-draw error / sqrt(draws)): a bias well above its floor is real. Writes <out>.json
and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import division
from benchmarks.common import run_info

# name -> (layer factory, input shape, which gradient)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "Conv2d weight, 32 per channel": (lambda: nn.Conv2d(16, 16, 3, padding=1), (2, 16, 4, 4), "weight"),
    "Conv2d weight, 512 per channel": (lambda: nn.Conv2d(16, 16, 3, padding=1), (8, 16, 8, 8), "weight"),
    "BatchNorm2d weight, 32 per channel": (lambda: nn.BatchNorm2d(16), (2, 16, 4, 4), "weight"),
    "BatchNorm2d weight, 512 per channel": (lambda: nn.BatchNorm2d(16), (8, 16, 8, 8), "weight"),
    "BatchNorm2d input, 32 per channel": (lambda: nn.BatchNorm2d(16), (2, 16, 4, 4), "input"),
    "BatchNorm2d input, 512 per channel": (lambda: nn.BatchNorm2d(16), (8, 16, 8, 8), "input"),
}


def gradient(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor, which: str) -> torch.Tensor:
    layer.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    layer(leaf).backward(gy)
    return (leaf.grad if which == "input" else layer.weight.grad).double()


def measure(make: Callable[[], nn.Module], shape: tuple[int, ...], which: str, draws: int,
            cfg: division.DivisionConfig) -> dict:
    torch.manual_seed(0)
    stock = make()
    layer = division.convert_model(make(), cfg)
    layer.load_state_dict(stock.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    gy = torch.randn(stock(x).shape, generator=g)
    exact = gradient(stock, x, gy, which)
    total = torch.zeros_like(exact)
    sq = torch.zeros_like(exact)
    for _ in range(draws):
        d = gradient(layer, x, gy, which)
        total += d
        sq += (d - exact) ** 2
    mean = total / draws
    norm = exact.norm().item()
    return {"bias": (mean - exact).norm().item() / norm,
            "noise_floor": (sq / draws).sum().sqrt().item() / norm / draws**0.5,
            "single_draw_error": (sq / draws).sum().sqrt().item() / norm}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--out", type=Path, help="output path without extension")
    args = parser.parse_args(argv)
    cfg = division.DivisionConfig(block_size=args.block_size, hfc_bits=args.bits)
    rows = []
    for name, (make, shape, which) in CASES.items():
        rows.append({"case": name, "shape": list(shape), **measure(make, shape, which, args.draws, cfg)})
        r = rows[-1]
        print(f"  {name}: bias {r['bias']:.2e} (noise floor {r['noise_floor']:.1e})", file=sys.stderr)
    table = ["| gradient | input | relative bias of the mean | its noise floor | one draw's relative error |",
             "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {r['bias']:.2e} | {r['noise_floor']:.1e} "
                     f"| {r['single_draw_error']:.3f} |")
    info = run_info(torch.device("cpu"))
    head = (f"Bias of DIVISION gradients (B={cfg.block_size}, Q={cfg.hfc_bits}), mean of {args.draws} draws, "
            f"torch {info['torch']}, git {info['git']}")
    text = "\n".join(table)
    print(f"{head}\n\n{text}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({**info, "draws": args.draws, "config": cfg.to_dict(),
                                                             "rows": rows}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(f"{head}\n\n`{info['command']}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
