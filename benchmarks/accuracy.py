"""Final top-1 of vanilla, DIVISION (default and a small B/Q grid) and ActNN, same recipe, several seeds.

    python benchmarks/accuracy.py --out logs/bench/accuracy                  # ResNet-18, Fashion-MNIST
    python benchmarks/accuracy.py --tiny --out /tmp/acc                      # CPU smoke test (synthetic)
    python benchmarks/accuracy.py --overrides trainer.epochs=30 --seeds 0 1 2 --out ...
    python benchmarks/accuracy.py --jobs 3 ...                               # three runs at a time

Each (method, seed) is one train.py run (experiment=demo without its CPU subset unless --overrides
says otherwise), its folder under <out>_runs/. Writes <out>.json (every run's final metrics, then
mean and standard deviation per method), <out>.md and <out>.png (mean +- std per method).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from benchmarks.common import ROOT, figure, run_info
from harness.schema import register_configs

# name -> overrides selecting the method
VARIANTS: dict[str, list[str]] = {
    "vanilla": ["method=vanilla"],
    "division B8 Q2": ["method=division", "division.block_size=8", "division.hfc_bits=2"],
    "division B4 Q2": ["method=division", "division.block_size=4", "division.hfc_bits=2"],
    "division B16 Q2": ["method=division", "division.block_size=16", "division.hfc_bits=2"],
    "division B8 Q1": ["method=division", "division.block_size=8", "division.hfc_bits=1"],
    "division B8 Q4": ["method=division", "division.block_size=8", "division.hfc_bits=4"],
    "actnn Q2": ["method=actnn", "method.actnn_bits=2"],
}
FULL = ["data.train_subset=null", "data.val_subset=null", "trainer.epochs=10", "trainer.batch_size=256", "optim.lr=0.1",
        "trainer.compare_with_vanilla=false"]
TINY = ["data=synthetic", "data.num_train=32", "data.num_val=16", "trainer.device=cpu", "trainer.batch_size=8",
        "trainer.max_steps=2", "trainer.epochs=1"]


def compose_cfg(overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def run_one(base: list[str], name: str, seed: int, out: Path) -> dict[str, Any]:
    """One train.py run of a variant and seed, through the harness users run."""
    from harness.run import train

    cfg = compose_cfg([*base, *VARIANTS[name], f"seed={seed}", "trainer.save_last=false"])
    result = train(cfg, Path(f"{out}_runs") / f"{name.replace(' ', '_')}_seed{seed}")
    print(f"{name} seed {seed}: top-1 {result['val_acc1']:.2f}", flush=True)
    return {"variant": name, "seed": seed, **{k: result.get(k) for k in (
        "val_acc1", "val_acc5", "val_loss", "train_loss", "act_mem_gib", "img_per_s", "epoch", "run_dir")}}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        accs = [r["val_acc1"] for r in runs if r["variant"] == name]
        out.append({"variant": name, "seeds": len(accs), "mean_top1": statistics.fmean(accs),
                    "std_top1": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min_top1": min(accs),
                    "max_top1": max(accs),
                    "act_mem_gib": statistics.fmean(r["act_mem_gib"] for r in runs if r["variant"] == name),
                    "img_per_s": statistics.fmean(r["img_per_s"] or 0 for r in runs if r["variant"] == name)})
    base = next((s["mean_top1"] for s in out if s["variant"] == "vanilla"), None)
    for s in out:
        s["delta_vs_vanilla"] = None if base is None else s["mean_top1"] - base
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    rows = ["| method | seeds | top-1 mean | std | min / max | vs vanilla | activation GiB | img/s |",
            "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        delta = "-" if s["delta_vs_vanilla"] is None else f"{s['delta_vs_vanilla']:+.2f}"
        rows.append(f"| {s['variant']} | {s['seeds']} | {s['mean_top1']:.2f} | {s['std_top1']:.2f} | "
                    f"{s['min_top1']:.2f} / {s['max_top1']:.2f} | {delta} | {s['act_mem_gib']:.4f} | {s['img_per_s']:.0f} |")
    return "\n".join(rows)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    with figure(path, figsize=(8, 4)) as (_, ax):
        names = [s["variant"] for s in summary]
        ax.bar(names, [s["mean_top1"] for s in summary], yerr=[s["std_top1"] for s in summary], capsize=4)
        lo = min(s["min_top1"] for s in summary)
        ax.set_ylim(max(0.0, lo - 2), min(100.0, max(s["max_top1"] for s in summary) + 1))
        ax.set_ylabel("final top-1 (%)")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (processes sharing the device)")
    parser.add_argument("--out", type=Path, required=True, help="output path without extension")
    args = parser.parse_args(argv)
    base = ["experiment=demo", *(TINY if args.tiny else FULL), *args.overrides]
    jobs = [(base, name, seed, args.out) for name in args.variants for seed in args.seeds]
    if args.jobs == 1:
        runs = [run_one(*job) for job in jobs]
    else:  # several runs share one GPU: a small model at batch 256 leaves most of it idle
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            runs = list(pool.map(run_one, *zip(*jobs)))
    summary = summarize(runs)
    table = markdown(summary)
    print(table)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    info = {**run_info(device), "overrides": base, "jobs": args.jobs}
    shared = f"\nimg/s with {args.jobs} runs sharing the device at a time.\n" if args.jobs > 1 else ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**info, "runs": runs, "summary": summary}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"accuracy benchmark on {info['device']}, git {info['git']}, {info['date']}\n\n`{info['command']}`\n\n"
        f"overrides: `{' '.join(base)}`\n\n{table}\n{shared}")
    plot(summary, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
