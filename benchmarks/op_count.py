"""ATen ops and custom ops run by one training step (forward + backward) of a converted model.

    python benchmarks/op_count.py --out logs/bench/op_count            # torchvision ResNet-50
    python benchmarks/op_count.py --model resnet18 --size 32 --batch 2  # quicker
    python benchmarks/op_count.py --amp bf16 --channels-last --out logs/bench/op_count_bf16_cl

CPU time per step matters as much as GPU time: under bf16 a ResNet-50 step on an H100 takes about
64 ms of GPU time, and every op costs a few microseconds of Python and dispatcher time. This counts
the ops that reach the backend kernels (a TorchDispatchMode sees them after autograd and after the
composite ops have decomposed), for stock, DIVISION and the other methods, on a small batch (the
count does not depend on the batch size). Writes <out>.json and <out>.md; prints the table with the
most frequent ops of each method.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import division
import models
from benchmarks.common import run_info
from harness.build import AMP_DTYPES
from harness.loop import Batch, train_step
from harness.methods import prepare


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_step(model_name: str, method: str, batch: int, size: int, amp: str = "off",
               channels_last: bool = False) -> collections.Counter[str]:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    prepared = prepare(models.build_model(model_name, num_classes=10), method, division.DivisionConfig())
    model = prepared.model.to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        train_step(model, Batch(x, y), None, None, AMP_DTYPES.get(amp), prepared.forward_context)

    step()  # one step first: lazy initialisation stays out of the count
    model.zero_grad(set_to_none=True)
    counter = OpCounter()
    with counter:
        step()
    return counter.counts


def markdown(results: dict[str, collections.Counter[str]], top: int) -> str:
    base = sum(results["vanilla"].values()) if "vanilla" in results else None
    out = ["| method | ops per step | x vanilla | most frequent |", "|---|---|---|---|"]
    for method, counts in results.items():
        total = sum(counts.values())
        ratio = f"{total / base:.2f}" if base else "-"
        common = ", ".join(f"{name} {n}" for name, n in counts.most_common(top))
        out.append(f"| {method} | {total} | {ratio} | {common} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=64, help="image side (ops do not depend on it)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["vanilla", "division"])
    parser.add_argument("--amp", choices=["off", *sorted(AMP_DTYPES)], default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--top", type=int, default=8, help="most frequent ops listed per method")
    parser.add_argument("--out", type=Path, help="output path without extension")
    args = parser.parse_args(argv)
    results = {m: count_step(args.model, m, args.batch, args.size, args.amp, args.channels_last) for m in args.methods}
    table = markdown(results, args.top)
    info = run_info(torch.device("cpu"))
    setting = f"amp {args.amp}{', channels_last' if args.channels_last else ''}"
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {setting}, forward + backward, CPU\n\n{table}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {**info, "model": args.model, "batch": args.batch, "size": args.size, "amp": args.amp,
                   "channels_last": args.channels_last,
                   "counts": {m: dict(c.most_common()) for m, c in results.items()},
                   "totals": {m: sum(c.values()) for m, c in results.items()}}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(
            f"Ops per training step (forward + backward), {args.model}, batch {args.batch}, "
            f"{args.size}x{args.size}, {setting}, CPU, torch {info['torch']}, git {info['git']}\n\n"
            f"`{info['command']}`\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
