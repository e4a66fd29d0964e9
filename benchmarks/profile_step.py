"""Where one training step's time goes: kernels grouped by kind, and host time against device time.

    python benchmarks/profile_step.py --out logs/bench/profile_resnet50              # GPU, bs 256, fp32
    python benchmarks/profile_step.py --amp bf16 --channels-last --out logs/bench/profile_resnet50_bf16
    python benchmarks/profile_step.py --device cpu --model resnet18 --batch 4 --size 32 --out /tmp/p

For each method (vanilla and division by default), after warm-up steps, --steps steps run under
torch.profiler. Device time per step is the summed time of the device kernels (CUDA on a GPU, the
operators' own time on a CPU), grouped into convolution, batch norm, compress, decompress, masks
(ReLU / Dropout packing and their backward), max-pool and other; host time per step is the wall
time Python spends issuing one step without waiting for the device, timed separately (when it
exceeds the device time, the GPU starves). Writes <out>.json and <out>.md with the per-group table
and the top kernels of each method.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import division
import models
from benchmarks.common import run_info
from harness.build import AMP_DTYPES
from harness.loop import Batch, train_step
from harness.measure import synchronize
from harness.methods import prepare

# group -> substrings of a kernel or operator name (lower case), tried in this order
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("decompress", ("decompress",)),
    ("compress", ("compress",)),
    ("masks", ("pack_kernel", "mask_grad", "relu", "threshold", "dropout", "pack_bool")),
    ("max-pool", ("pool",)),
    ("batch norm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford", "_bn")),
    ("convolution", ("conv", "gemm", "xmma", "cudnn", "cutlass", "wgrad", "dgrad", "implicit", "sm90", "sm80")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def build(model_name: str, method: str, args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    prepared = prepare(models.build_model(model_name, num_classes=1000), method, division.DivisionConfig())
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = prepared.model.to(device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    def step() -> None:
        train_step(model, Batch(x, y), opt, None, AMP_DTYPES.get(args.amp), prepared.forward_context)

    return step


def host_ms(step, device: torch.device, steps: int) -> float:
    """Median wall time of issuing one step, the device queue drained before each."""
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    synchronize(device)
    return statistics.median(times) * 1e3


def profile(step, device: torch.device, steps: int) -> dict[str, tuple[float, int]]:
    """kernel (or operator) name -> (device ms per step, calls per step)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    out: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        if device.type == "cuda":
            us = e.self_device_time_total if e.device_type == torch.autograd.DeviceType.CUDA else 0
        else:  # on a CPU the operators' own time is the device time; wrappers add ~0
            us = e.self_cpu_time_total if "::" in e.key else 0
        if us > 0:
            out[e.key] = (us / 1e3 / steps, e.count // steps)
    return out


def summarize(kernels: dict[str, tuple[float, int]]) -> dict[str, float]:
    groups: collections.Counter[str] = collections.Counter()
    for name, (ms, _) in kernels.items():
        groups[group_of(name)] += ms
    return dict(groups)


def markdown(results: dict[str, dict], top: int) -> str:
    names = [g for g, _ in GROUPS] + ["other"]
    out = ["| method | host ms/step | device ms/step | " + " | ".join(names) + " |",
           "|---|---|---|" + "---|" * len(names)]
    for method, r in results.items():
        cells = " | ".join(f"{r['groups'].get(g, 0.0):.2f}" for g in names)
        out.append(f"| {method} | {r['host_ms']:.1f} | {r['device_ms']:.1f} | {cells} |")
    for method, r in results.items():
        out += ["", f"Top kernels, {method} (ms per step, calls per step, group):", "",
                "| kernel | ms | calls | group |", "|---|---|---|---|"]
        ranked = sorted(r["kernels"].items(), key=lambda kv: -kv[1][0])[:top]
        for name, (ms, calls) in ranked:
            out.append(f"| `{name[:90]}` | {ms:.3f} | {calls} | {group_of(name)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--methods", nargs="+", default=["vanilla", "division"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--amp", choices=("off", "bf16"), default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="output path without extension")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results: dict[str, dict] = {}
    for method in args.methods:
        step = build(args.model, method, args, device)
        for _ in range(args.warmup):
            step()
        kernels = profile(step, device, args.steps)
        results[method] = {"host_ms": host_ms(step, device, args.steps), "kernels": kernels,
                           "device_ms": sum(ms for ms, _ in kernels.values()), "groups": summarize(kernels)}
        print(f"{method}: host {results[method]['host_ms']:.1f} ms, device {results[method]['device_ms']:.1f} ms per step",
              file=sys.stderr)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = markdown(results, args.top)
    info = run_info(device)
    head = (f"One training step of {args.model}, batch {args.batch}, {args.size}x{args.size}, amp {args.amp}"
            f"{', channels_last' if args.channels_last else ''} on {info['device']}, torch {info['torch']}, "
            f"git {info['git']}")
    print(f"{head}\n\n{table}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {**info, "model": args.model, "batch": args.batch, "size": args.size, "amp": args.amp,
                   "channels_last": args.channels_last, "results": results}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(f"{head}\n\n`{info['command']}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
