"""A converted model under torch.compile(model, fullgraph=True): does it stay compressed, and how fast.

    python benchmarks/compile_check.py --out logs/bench/compile_resnet18_cpu --device cpu
    python benchmarks/compile_check.py --model resnet50 --size 224 --batch 64 --device cuda --out ...

For stock and DIVISION, eager and compiled (default inductor backend): the activation bytes of one
batch, the seconds of the first (compiling) step and the median of later steps, and the cosine of
the model's gradient to the exact (stock eager) one. The activation bytes are what train.py's
harness.measure.ActivationProbe measures: on a GPU, allocated memory just before backward less the
output and loss; on a CPU, the bytes autograd saves (division.saved.SavedBytes), there taken for
batch 2b minus batch b (what grows with the batch: a compiled graph also saves copies of the
weights, which stock compiled keeps too). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import division
import models
from benchmarks.common import run_info
from harness.loop import Batch, train_step
from harness.measure import ActivationProbe, synchronize
from harness.methods import prepare

ForwardContext = Callable[[], contextlib.AbstractContextManager]


def probed_step(run: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, forward_context: ForwardContext) -> int:
    """The activation bytes ActivationProbe gives for one training step of batch x (backward is run)."""
    probe = ActivationProbe(x.device, run)
    probe.before_fetch()
    train_step(run, Batch(x, y), None, forward_context=forward_context, probe=probe)
    return probe.activation_bytes or 0


def activation_bytes(
    run: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
    forward_context: ForwardContext = contextlib.nullcontext,
) -> int:
    """What one step of batch x keeps for backward (see the module docstring)."""
    if x.is_cuda:
        return probed_step(run, x, y, forward_context)
    twice = torch.cat([x, x]), torch.cat([y, y])
    return probed_step(run, *twice, forward_context) - probed_step(run, x, y, forward_context)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.double().flatten() for p in model.parameters()])


def measure(base: torch.nn.Module, method: str, compiled: bool, x, y, exact: torch.Tensor, steps: int) -> dict:
    prepared = prepare(copy.deepcopy(base), method, division.DivisionConfig())  # harness/methods.py
    model = prepared.model
    run = torch.compile(model, fullgraph=True) if compiled else model

    def step() -> None:
        model.zero_grad(set_to_none=True)
        train_step(run, Batch(x, y), None, forward_context=prepared.forward_context)
        synchronize(x.device)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    cosine = F.cosine_similarity(flat_grad(model), exact, dim=0).item()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    act = activation_bytes(run, x, y, prepared.forward_context)  # the same shapes: no recompilation
    return {"method": method, "compiled": compiled, "activation_mib": act / 2**20, "first_step_s": first,
            "step_s": statistics.median(times), "grad_cosine_to_exact": cosine}


def markdown(rows: list[dict]) -> str:
    stock = {r["compiled"]: r["activation_mib"] for r in rows if r["method"] == "vanilla"}
    out = ["| method | compiled | activation MiB | x smaller than stock (same mode) | first step s | step s | grad cosine to exact |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = stock.get(r["compiled"], 0) / r["activation_mib"] if r["activation_mib"] else float("nan")
        out.append(f"| {r['method']} | {'yes' if r['compiled'] else 'no'} | {r['activation_mib']:.3f} | {ratio:.1f} "
                   f"| {r['first_step_s']:.1f} | {r['step_s']:.3f} | {r['grad_cosine_to_exact']:.4f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="output path without extension")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = models.build_model(args.model, num_classes=10).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    y = (torch.arange(args.batch) % 10).to(device)
    ref = copy.deepcopy(base)
    F.cross_entropy(ref(x), y).backward()
    exact = flat_grad(ref)
    rows = [measure(base, method, compiled, x, y, exact, args.steps)
            for method in ("vanilla", "division") for compiled in (False, True)]
    table = markdown(rows)
    info = run_info(device)
    head = (f"torch.compile(fullgraph=True) of {args.model}, batch {args.batch}, {args.size}x{args.size}, "
            f"on {info['device']}, torch {info['torch']}, git {info['git']}")
    print(f"{head}\n\n{table}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({**info, "model": args.model, "batch": args.batch,
                                                             "size": args.size, "rows": rows}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(f"{head}\n\n`{info['command']}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
