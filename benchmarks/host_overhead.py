"""Host time per layer call (forward + backward), stock against converted, on tiny inputs.

    python benchmarks/host_overhead.py --out logs/bench/host_overhead                 # CPU
    python benchmarks/host_overhead.py --device cuda --amp bf16 --channels-last --out ...

A converted layer is a Python autograd Function around the op calls, and DIVISION adds the
compress and decompress ops: host time the GPU does not see, but that caps a step whenever it
exceeds the device time (a bf16 ResNet-50 step on an H100 is ~65 ms of device time). On inputs so
small that the device finishes each kernel at once, the wall time of a call is the host time it
costs. For each kind of layer in ResNet-50 (conv, timed as a 3x3; batch norm; ReLU; max-pool),
--iters calls of forward + backward are timed for chains of 2 and of 6 such layers (the median of
--repeats runs), stock, converted in exact mode (the Function alone: nothing compressed) and in
division mode. The slope over the chains is the cost of one layer call; the rest (the root
module's call and pre-hook, a converted model's seed draw, the loss's backward) is paid once per
forward, and a lone layer would count it with every call. The extra over stock per layer is
weighted by how many such layers torchvision's ResNet-50 has, plus the extra once per forward, to
give the extra host time of one step. On a CPU the CPU twin of the kernels runs the codec, so the
division column includes its (small) compute. Writes <out>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

import division
from benchmarks.common import figure, run_info
from harness.build import AMP_DTYPES
from harness.measure import synchronize

VARIANTS = ("stock", "exact", "division")
DEPTHS = (2, 6)  # layers in the two chains timed: the slope between them is one layer's cost


def layer_kinds(channels: int) -> dict[str, tuple[type, nn.Module]]:
    """name -> (the module class counted in ResNet-50, one layer of that kind)."""
    return {
        "conv": (nn.Conv2d, nn.Conv2d(channels, channels, 3, padding=1, bias=False)),
        "batch norm": (nn.BatchNorm2d, nn.BatchNorm2d(channels)),
        "relu": (nn.ReLU, nn.ReLU()),
        "max-pool 3x3/2": (nn.MaxPool2d, nn.MaxPool2d(3, 2, 1)),
    }


def resnet50_counts(kinds: dict[str, tuple[type, nn.Module]]) -> dict[str, int]:
    """How many calls of each kind one forward of torchvision's ResNet-50 makes (a block's one
    ReLU module is called three times), counted with forward hooks."""
    model = torchvision.models.resnet50().eval()
    counts = dict.fromkeys(kinds, 0)
    for m in model.modules():
        for name, (cls, _) in kinds.items():
            if type(m) is cls:
                m.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    return counts


def variant(layer: nn.Module, name: str) -> nn.Module:
    if name == "stock":
        return copy.deepcopy(layer)
    return division.convert_model(copy.deepcopy(layer), division.DivisionConfig(backward_mode=name))


def per_call_us(module: nn.Module, x: torch.Tensor, amp: torch.dtype | None, iters: int, repeats: int) -> float:
    """Median over repeats of the wall time of one forward + backward, in microseconds."""
    def run(n: int) -> float:
        synchronize(x.device)
        t0 = time.perf_counter()
        for _ in range(n):
            with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                y = module(x)
            y.backward(torch.ones_like(y))
        synchronize(x.device)
        return (time.perf_counter() - t0) / n * 1e6

    run(max(10, iters // 10))  # warm-up: lazy initialisation, allocator, kernel selection
    return statistics.median(run(iters) for _ in range(repeats))


def chain(layer: nn.Module, depth: int) -> nn.Sequential:
    return nn.Sequential(*(copy.deepcopy(layer) for _ in range(depth)))


def measure(args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(us per layer call, us once per forward) for each kind and variant: the slope and the
    intercept of a chain's forward + backward time over its depth."""
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    kinds = layer_kinds(args.channels)
    rows: dict[str, dict[str, float]] = {}
    fixed: dict[str, dict[str, float]] = {}
    for name, (_, layer) in kinds.items():
        layer = layer.to(device).to(memory_format=fmt)
        x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
        x = x.contiguous(memory_format=fmt).requires_grad_()
        rows[name], fixed[name] = {}, {}
        for v in VARIANTS:
            short, long = (per_call_us(variant(chain(layer, d), v), x, AMP_DTYPES.get(args.amp), args.iters, args.repeats)
                           for d in DEPTHS)
            rows[name][v] = (long - short) / (DEPTHS[1] - DEPTHS[0])
            fixed[name][v] = short - DEPTHS[0] * rows[name][v]
    return rows, fixed


def step_extra_ms(rows: dict[str, dict[str, float]], fixed: dict[str, dict[str, float]], counts: dict[str, int],
                  v: str) -> tuple[float, float]:
    """(extra host ms of one ResNet-50 step over stock, of it the extra once per forward: the
    median over the kinds' intercepts)."""
    once = statistics.median(f[v] - f["stock"] for f in fixed.values())
    return (sum(counts[n] * (r[v] - r["stock"]) for n, r in rows.items()) + once) / 1e3, once / 1e3


def markdown(rows: dict[str, dict[str, float]], fixed: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    out = ["| layer | calls in a ResNet-50 step | stock us per call | exact us (+) | division us (+) |",
           "|---|---|---|---|---|"]
    for name, r in rows.items():
        cells = " | ".join(f"{r[v]:.1f} ({r[v] - r['stock']:+.1f})" for v in VARIANTS[1:])
        out.append(f"| {name} | {counts[name]} | {r['stock']:.1f} | {cells} |")
    extra = {v: step_extra_ms(rows, fixed, counts, v) for v in VARIANTS[1:]}
    out.append("| once per forward (root call and hook, seed draw), median over the kinds | 1 | | "
               + " | ".join(f"({1e3 * extra[v][1]:+.1f})" for v in VARIANTS[1:]) + " |")
    out.append(f"| ResNet-50 step, extra host ms | | | {extra['exact'][0]:+.1f} | {extra['division'][0]:+.1f} |")
    return "\n".join(out)


def plot(rows: dict[str, dict[str, float]], path: Path, title: str) -> None:
    with figure(path, figsize=(7, 3.5)) as (_, ax):
        width = 0.8 / len(VARIANTS)
        for i, v in enumerate(VARIANTS):
            ax.bar([k + i * width for k in range(len(rows))], [r[v] for r in rows.values()], width, label=v)
        ax.set_xticks([k + width for k in range(len(rows))], list(rows))
        ax.set_ylabel("host us per layer call (forward + backward)")
        ax.set_title(title, fontsize=9)
        ax.legend()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["off", *AMP_DTYPES], default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=200, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, help="output path without extension")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # the host's one issuing thread, as on a GPU
    rows, fixed = measure(args)
    counts = resnet50_counts(layer_kinds(args.channels))
    info = run_info(torch.device(args.device))
    title = (f"Host time per layer call, input {args.batch}x{args.channels}x{args.size}x{args.size}, "
             f"amp {args.amp}{', channels_last' if args.channels_last else ''}, on {info['device']}")
    table = markdown(rows, fixed, counts)
    print(f"{title}\n\n{table}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {**info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "once_per_forward": fixed,
                   "counts": counts, "depths": DEPTHS}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(
            f"{title}, torch {info['torch']}, git {info['git']}\n\n`{info['command']}`\n\n{table}\n")
        plot(rows, args.out.with_suffix(".png"), title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
