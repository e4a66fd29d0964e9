"""The memory peak of one training step of a converted torchvision model, and its codec op calls.

    python benchmarks/step_peak.py --model resnet50 --size 224 --batch 2 --compile   # CPU

Where activation memory (compile_check.py, memory_speed.py) is what a step keeps for backward,
this is the most it holds at once, backward included: what decides whether a batch fits. After
two warm-up steps (compiling, under --compile), one step runs under torch.profiler with memory
events: on a CPU the peak is the running sum of the allocations and frees it records, above the
step's start; on a GPU, max_memory_allocated above the allocation at the start. Also the calls
of each division op in the step (compress and decompress: how many records and rebuilds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.profiler import ProfilerActivity, profile

import division
from benchmarks.common import run_info
from harness.measure import ActivationProbe

MIB = 2.0**20


def cpu_peak_bytes(prof: profile) -> int:
    """The highest running sum of the CPU memory events, in time order."""
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    held = peak = 0
    for e in events:
        held += e.cpu_memory_usage
        peak = max(peak, held)
    return peak


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=10).to(device)
    model = division.convert_model(model, division.DivisionConfig(backward_mode=args.mode))
    run = torch.compile(model, fullgraph=True) if args.compile else model
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step() -> None:
        F.cross_entropy(run(x), y).backward()

    for _ in range(2):
        model.zero_grad(set_to_none=True)
        step()
    model.zero_grad(set_to_none=True)  # outside the measured step: its frees would lower the start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    probe = ActivationProbe(device, model)  # on a GPU: the allocator's peak above the start
    probe.before_fetch()
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    probe.after_step()
    peak = cpu_peak_bytes(prof) if probe.peak_bytes is None else probe.peak_bytes
    calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("division::")}
    return {"peak_mib": peak / MIB, "calls": calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mode", default="division", help="backward_mode of the converted model")
    parser.add_argument("--compile", action="store_true", help="torch.compile(model, fullgraph=True)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="output path without extension (writes .json)")
    args = parser.parse_args(argv)
    result = measure(args)
    calls = ", ".join(f"{k.removeprefix('division::')} {v}" for k, v in sorted(result["calls"].items()))
    print(f"{args.model} {args.size}x{args.size} batch {args.batch}, {args.mode}"
          f"{', compiled' if args.compile else ''}: step peak {result['peak_mib']:.1f} MiB; calls: {calls}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        info = run_info(torch.device(args.device))
        args.out.with_suffix(".json").write_text(json.dumps({**info, "args": vars(args) | {"out": str(args.out)},
                                                             **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
