"""Activation memory, peak memory and training throughput of every method, side by side in one run.

    python benchmarks/memory_speed.py --mode memory --out logs/bench/memory     # GPU, full size
    python benchmarks/memory_speed.py --mode speed --out logs/bench/speed
    python benchmarks/memory_speed.py --mode both --compile --out logs/bench/compiled   # one build each
    python benchmarks/memory_speed.py --mode speed --compile reduce-overhead --out ...    # CUDA graphs
    python benchmarks/memory_speed.py --mode memory --tiny --out /tmp/mem       # CPU smoke test
    python benchmarks/memory_speed.py --mode both --models mvit_v2_s --frames 16 --batches 8 --methods vanilla division --out ...   # video

Grid: models (ResNet-50, WRN-50-2) x batch sizes (64, 128, 256, 512) x methods (vanilla, division,
checkpoint, swap, actnn) x precision (fp32, bf16 autocast), synthetic 224x224 data already on the
device, SGD (lr 0.1, momentum 0.9, wd 1e-4) as the paper's benchmark.
memory: on the first step, activation memory as the paper defines it (allocated before backward
minus allocated before the batch, minus output and loss) and the peak allocated during the step
above the same start; the step lets go of its batch after forward (harness.loop.Batch), so the
batch counts where a layer keeps it. `--find-max` also searches the largest batch that fits
(cuDNN's autotuner off, each try printed as it ends).
speed: img/s of whole training steps, timed with CUDA events after warm-up, median over repeats
(with --frames, of clips: a video model's batch is (batch, 3, frames, size, size)).
both: memory, then speed, of each model built (and compiled) once; the measured step is one of the
warm-up steps. A compile of ResNet-50 takes a minute or more: this halves the compiles.
--compile [MODE] runs every model under torch.compile(fullgraph=True, mode=MODE) (default inductor
backend); memory is then read on the step after the one that compiles. The modes that replay CUDA
graphs (reduce-overhead, max-autotune) take the host's time per op out of a step; they measure
speed only, since a graph's memory pool holds its activations from one step to the next.
Writes <out>.json (rows + device, versions, git hash, command), <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import division
import models
from benchmarks.common import add_plan_arguments, figure, run_info
from harness.build import AMP_DTYPES
from harness.loop import Batch, train_step
from harness.measure import GIB, ActivationProbe
from harness.methods import method_names, prepare
from harness.schema import COMPILE_MODES

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs

CPU_COMPILED_NOTE = (
    "\nOn a CPU under torch.compile, activation GiB also counts the copies of the weights that the "
    "compiled graph saves for backward; `benchmarks/compile_check.py` takes the difference of two "
    "batches instead. On a GPU the allocator's reading is the paper's definition.\n"
)


def setup(model_name: str, method: str, batch: int, args: argparse.Namespace, device: torch.device):
    """(module to run, prepared method, optimizer, batch, labels); the module is compiled with --compile."""
    torch.manual_seed(0)
    model = models.build_model(model_name, num_classes=1000)
    prepared = prepare(model, method, division.DivisionConfig(layer_bits=args.layer_bits, exclude=args.exclude))
    fmt = torch.contiguous_format
    if args.channels_last:
        fmt = torch.channels_last_3d if args.frames else torch.channels_last
    model = prepared.model.to(device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    frames = (args.frames,) if args.frames else ()
    x = torch.randn(batch, 3, *frames, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    run = torch.compile(model, fullgraph=True, mode=args.compile) if args.compile else model
    return run, prepared, opt, x, y


def step(model, prepared, opt, x, y, amp: str, probe: ActivationProbe | None = None) -> None:
    """One training step: the harness's own (harness.loop.train_step)."""
    if probe:
        probe.before_fetch()
        # the batch counts as the paper counted it (it arrives after the start reading), as long as
        # a layer holds it: the step lets go of its copy after forward (harness.loop.Batch)
        batch = Batch(x.clone(), y)
    else:
        batch = Batch(x, y)
    train_step(model, batch, opt, None, AMP_DTYPES.get(amp), prepared.forward_context, probe)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)


def measure(model_name: str, method: str, batch: int, amp: str, args: argparse.Namespace, device: torch.device,
            memory: bool = True, speed: bool = True) -> dict[str, Any]:
    """Memory (the first step after any compiling one, under an ActivationProbe) and/or img/s
    (whole steps after warm-up, timed with CUDA events, median over repeats) of one model built
    once: with both, the measured step counts as a warm-up, so one compile serves both figures."""
    row: dict[str, Any] = {"oom": False}
    # what the step may use: free device memory at rest (the previous run's cache is emptied)
    cuda = device.type == "cuda"
    capacity = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) if cuda else None
    try:
        model, prepared, opt, x, y = setup(model_name, method, batch, args, device)
        stepped = 0
        if memory:
            if args.compile:
                step(model, prepared, opt, x, y, amp)  # compiles: memory is read on the next step
            probe = ActivationProbe(device, prepared.model)
            step(model, prepared, opt, x, y, amp, probe)
            stepped = 2 if args.compile else 1
            row["act_gib"] = probe.activation_bytes / GIB
            row["peak_gib"] = None if probe.peak_bytes is None else probe.peak_bytes / GIB
            if capacity is not None:  # for the largest-batch search's prediction
                row["used_gib"] = (probe.start + probe.peak_bytes) / GIB
                row["capacity_gib"] = capacity / GIB
        if speed:
            for _ in range(max(0, args.warmup - stepped)):
                step(model, prepared, opt, x, y, amp)
            rates = [batch * args.steps / timed_steps(model, prepared, opt, x, y, amp, args.steps, device)
                     for _ in range(args.repeats)]
            row.update(img_per_s=statistics.median(rates), img_per_s_all=rates)
    except RuntimeError as err:
        if not is_oom(err):
            raise
        row["oom"] = True
    finally:
        free(device)
    if memory:
        row.setdefault("act_gib", None)
        row.setdefault("peak_gib", None)
    if speed:
        row.setdefault("img_per_s", None)
    return row


def timed_steps(model, prepared, opt, x, y, amp: str, steps: int, device: torch.device) -> float:
    """Seconds of `steps` training steps: CUDA events on a GPU (the queue stays full), wall time
    on a CPU."""
    cuda = device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(model, prepared, opt, x, y, amp)
    if not cuda:
        return time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3


def measure_memory(model_name: str, method: str, batch: int, amp: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return measure(model_name, method, batch, amp, args, device, memory=True, speed=False)


USABLE = 0.97  # of the device memory free at rest: what a step's allocations can reach (fragmentation)
AROUND = 0.013  # the search tries the predicted largest batch -1.3% and +1.3%: a 3% bracket


def predicted_largest(tried: dict[int, dict[str, Any]]) -> float | None:
    """Where the line through the memory use of the two largest batches that fitted reaches the
    usable device memory; None without two such readings (on a CPU there are none)."""
    readings = sorted((b, r["used_gib"], r["capacity_gib"]) for b, r in tried.items()
                      if not r["oom"] and r.get("used_gib") is not None and r.get("capacity_gib") is not None)
    if len(readings) < 2:
        return None
    (b1, u1, _), (b2, u2, capacity) = readings[-2:]
    slope = (u2 - u1) / (b2 - b1)
    return b2 + (USABLE * capacity - u2) / slope if slope > 0 else None


def next_batch(lo: int, tried: dict[int, dict[str, Any]]) -> int:
    """The next batch to try above `lo`, which fits: just below the predicted largest, then just
    above it, else twice lo."""
    guess = predicted_largest(tried)
    if guess is not None:
        for b in (int(guess * (1 - AROUND)), int(guess * (1 + AROUND)) + 1):
            if b > lo:
                return b
    return 2 * lo


def largest_batch(model_name: str, method: str, amp: str, args: argparse.Namespace, device: torch.device,
                  start: int) -> tuple[int, bool, dict[str, Any]]:
    """The largest batch for which one training step fits, to within 3%: (the batch, whether the
    search stopped at --max-search with it still fitting, so that the true largest is higher, and
    the batch's memory row). From `start` up by doubling, then bisection; on a GPU, once two batches
    fit, the line through their memory use predicts where the device runs out and the search tries
    1.3% below and above that first, going on by doubling or bisection from whatever they show
    (for a ResNet-50-like line, 4 tries in all where doubling and bisection take 11: tests/
    test_benchmarks.py). Each try is printed, so a run stopped midway still tells the bracket."""
    tried: dict[int, dict[str, Any]] = {}

    def fits(b: int) -> bool:
        row = tried[b] = measure_memory(model_name, method, b, amp, args, device)
        print(f"  {method} bs {b}: " + ("OOM" if row["oom"] else f"fits, peak {fmt(row.get('peak_gib'), '.2f')} GiB"),
              flush=True)
        return not row["oom"]

    lo, hi = 0, min(start, args.max_search)
    while fits(hi):
        lo = hi
        if lo >= args.max_search:
            return lo, True, tried[lo]
        hi = min(next_batch(lo, tried), args.max_search)
    while hi - lo > max(1, lo // 32):  # to within 3%
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False, tried.get(lo, {"oom": True, "act_gib": None, "peak_gib": None})  # lo = 0: none fits


def largest_batch_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The largest batch of every model, precision and method, with its memory. cuDNN's autotuner
    is off meanwhile: at thousands of images it would time every algorithm of every new shape for
    each batch tried; the batch found is the largest with cuDNN's default choice of algorithms."""
    rows = []
    autotune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        for model_name, amp, method in itertools.product(args.models, args.amp, args.methods):
            best, capped, row = largest_batch(model_name, method, amp, args, device, start=max(args.batches))
            rows.append({"model": model_name, "amp": amp, "batch": best, "method": method, "largest_batch": True,
                         "search_capped": capped, **row})
            print(f"largest batch {model_name} {amp} {method}: {'>= ' if capped else ''}{best}", flush=True)
    finally:
        torch.backends.cudnn.benchmark = autotune
    return rows


def with_ratios(rows: list[dict[str, Any]], key: str) -> None:
    base = {(r["model"], r["amp"], r["batch"]): r.get(key) for r in rows if r["method"] == "vanilla"}
    for r in rows:
        v, b = r.get(key), base.get((r["model"], r["amp"], r["batch"]))
        r[f"{key}_vs_vanilla"] = (v / b) if v and b else None


def fmt(v: Any, spec: str = ".3f", oom: bool = False) -> str:
    """A measured figure; "OOM" for one not measured because the step ran out of memory."""
    return "OOM" if oom and v is None else ("-" if v is None else format(v, spec))


def measures(mode: str) -> tuple[bool, bool]:
    """(memory, speed): what a --mode measures."""
    return mode in ("memory", "both"), mode in ("speed", "both")


def markdown(rows: list[dict[str, Any]], mode: str) -> str:
    memory, speed = measures(mode)
    head = ["model", "amp", "batch", "method"]
    head += ["activation GiB", "x smaller than vanilla", "peak GiB"] if memory else []
    head += ["img/s", "x vanilla"] if speed else []
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("largest_batch"):
            continue
        cells = [r["model"], r["amp"], str(r["batch"]), r["method"]]
        if memory:
            ratio = r.get("act_gib_vs_vanilla")
            cells += [fmt(r["act_gib"], oom=r["oom"]), "-" if not ratio else format(1 / ratio, ".1f"),
                      fmt(r["peak_gib"], oom=r["oom"])]
        if speed:
            ratio = r.get("img_per_s_vs_vanilla")
            cells += [fmt(r["img_per_s"], ".1f", r["oom"]), "-" if not ratio else format(ratio, ".2f")]
        out.append("| " + " | ".join(cells) + " |")
    largest = [r for r in rows if r.get("largest_batch")]
    if largest:
        out += ["", "| model | amp | method | largest batch that fits | activation GiB | peak GiB |",
                "|---|---|---|---|---|---|"]
        for r in largest:
            batch = f">= {r['batch']} (the search's cap)" if r["search_capped"] else str(r["batch"])
            out.append(f"| {r['model']} | {r['amp']} | {r['method']} | {batch} | {fmt(r['act_gib'], oom=r['oom'])} | "
                       f"{fmt(r['peak_gib'], oom=r['oom'])} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], mode: str, path: Path) -> None:
    """A panel per model and precision; memory above img/s where both were measured."""
    memory, speed = measures(mode)
    figures = ([("act_gib", "activation memory (GiB)")] if memory else []) + ([("img_per_s", "img/s")] if speed else [])
    panels = sorted({(r["model"], r["amp"]) for r in rows})
    with figure(path, len(figures), len(panels), figsize=(5 * len(panels), 4 * len(figures)), squeeze=False) as (_, axes):
        for row_axes, (key, label) in zip(axes, figures):
            for ax, (model_name, amp) in zip(row_axes, panels):
                for method in method_names():
                    pts = [(r["batch"], r[key]) for r in rows if r["model"] == model_name and r["amp"] == amp
                           and r["method"] == method and r.get(key) is not None]
                    if pts:
                        ax.plot(*zip(*sorted(pts)), marker="o", label=method)
                ax.set_title(f"{model_name}, {amp}")
                ax.set_xlabel("batch size")
                ax.set_ylabel(label)
                ax.set_xscale("log", base=2)
                ax.grid(alpha=0.3)
                ax.legend()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("memory", "speed", "both"), required=True,
                        help="both: memory, then speed of the same model (one compile for both)")
    parser.add_argument("--models", nargs="+", default=["resnet50", "wrn50_2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256, 512])
    parser.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    parser.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=("off", "bf16"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--frames", type=int, default=0,
                        help="video models (r3d_18, s3d, swin3d_t, mvit_v2_s, ...): clips of this many frames")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES[1:],
                        metavar="MODE", help="torch.compile(model, fullgraph=True, mode=MODE) every model "
                        "(MODE: default if omitted)")
    parser.add_argument("--find-max", action="store_true", help="memory / both: also the largest batch that fits")
    parser.add_argument("--max-search", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="speed mode: steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_plan_arguments(parser)  # division's per-layer settings
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: resnet18 at 32x32, batches 2 and 4")
    parser.add_argument("--out", type=Path, required=True, help="output path without extension")
    args = parser.parse_args(argv)
    if args.tiny:
        args.models, args.batches, args.image_size = ["resnet18"], [2, 4], 32
        args.warmup, args.steps, args.repeats, args.max_search = 1, 1, 2, 8
    if args.compile in CUDA_GRAPH_MODES and args.mode != "speed":
        parser.error(f"--compile {args.compile} replays CUDA graphs, whose memory pools hold activations "
                     "between steps: measure it with --mode speed (memory with --compile default)")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory, speed = measures(args.mode)
    rows: list[dict[str, Any]] = []
    grid = list(itertools.product(args.models, args.amp, args.batches, args.methods))
    for i, (model_name, amp, batch, method) in enumerate(grid, 1):
        row = {"model": model_name, "amp": amp, "batch": batch, "method": method,
               **measure(model_name, method, batch, amp, args, device, memory, speed)}
        rows.append(row)
        shown = ([f"{fmt(row['act_gib'], oom=row['oom'])} GiB"] if memory else []) + (
            [f"{fmt(row['img_per_s'], '.1f', row['oom'])} img/s"] if speed else [])
        print(f"[{i}/{len(grid)}] {model_name} {amp} bs {batch} {method}: {', '.join(shown)}", flush=True)
    if memory and args.find_max:
        rows += largest_batch_rows(args, device)
    for key, measured in (("act_gib", memory), ("img_per_s", speed)):
        if measured:
            with_ratios(rows, key)
    table = markdown(rows, args.mode)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = {**run_info(device), "mode": args.mode, "image_size": args.image_size, "frames": args.frames,
            "channels_last": args.channels_last, "compile": args.compile}
    args.out.with_suffix(".json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"{args.mode} benchmark on {info['device']}, torch {info['torch']}, git {info['git']}, {info['date']}"
        f"{', channels_last' if args.channels_last else ''}"
        f"{f', clips of {args.frames} frames (img/s counts clips)' if args.frames else ''}"
        f"{f', torch.compile mode={args.compile}' if args.compile else ''}\n\n"
        f"`{info['command']}`\n\n{table}\n" + (CPU_COMPILED_NOTE if memory and args.compile and device.type == "cpu" else "")
    )
    plot(rows, args.mode, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
