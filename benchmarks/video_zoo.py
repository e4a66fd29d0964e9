"""What convert_model saves on torchvision's video classifiers.

    python benchmarks/video_zoo.py --out logs/bench/video_zoo
    python benchmarks/video_zoo.py --models r3d_18 --tiny --out /tmp/video   # smoke test

For each model (random weights, 10 classes): the activation memory autograd saves for one
training-mode forward of a clip at the size the model is built for (division.summary: each storage
once, parameters left out), stock and converted, and the saved bytes of the converted model by
kind of layer. Memory only: there is no video data on this machine, and a CPU takes minutes for a
gradient of these models. Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

import torch
import torchvision
from tqdm import tqdm

import division
from benchmarks.common import figure, run_info

# (frames, side) of the clips each model is built for (MViT's positional encoding fixes it; the
# others are at their usual training size)
CLIPS = {"r3d_18": (16, 112), "mc3_18": (16, 112), "r2plus1d_18": (16, 112), "s3d": (16, 224),
         "swin3d_t": (16, 224), "mvit_v1_b": (16, 224), "mvit_v2_s": (16, 224)}


def measure(name: str, clip: tuple[int, int], batch: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = division.convert_model(torchvision.models.get_model(name, num_classes=10))
    frames, side = clip
    report = division.summary(model, torch.randn(batch, 3, frames, side, side, generator=torch.Generator().manual_seed(1)))
    by_kind: dict[str, float] = collections.defaultdict(float)
    for row in report.rows:
        by_kind[row.kind] += row.saved_bytes / 2**20
    top = sorted(by_kind.items(), key=lambda kv: -kv[1])[:3]
    return {"model": name, "clip": list(clip), "batch": batch, "stock_mib": report.total_vanilla_bytes / 2**20,
            "saved_mib": report.total_saved_bytes / 2**20, "ratio": report.ratio,
            "converted": len(report.converted), "kept": len(report.unconverted), "largest": top}


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| model | clip (frames x side^2), batch | stock MiB | converted MiB | x smaller | what the converted model saves most |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        largest = ", ".join(f"{kind} {mib:.1f}" for kind, mib in r["largest"])
        out.append(f"| {r['model']} | {r['clip'][0]}x{r['clip'][1]}x{r['clip'][1]}, {r['batch']} | {r['stock_mib']:.1f} | "
                   f"{r['saved_mib']:.1f} | {r['ratio']:.1f}x | {largest} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    with figure(path, 1, 1, figsize=(7, 3.6)) as (_, ax):
        names = [r["model"] for r in rows]
        ax.bar(range(len(rows)), [r["ratio"] for r in rows])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("activation memory, x smaller than stock")
        ax.grid(axis="y", alpha=0.3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CLIPS), choices=list(CLIPS))
    parser.add_argument("--batch", type=int, default=1, help="clips in the batch")
    parser.add_argument("--tiny", action="store_true", help="smoke test: 4x32x32 clips (models built for their size refuse)")
    parser.add_argument("--out", type=Path, required=True, help="output path without extension")
    args = parser.parse_args(argv)
    rows = [measure(name, (4, 32) if args.tiny else CLIPS[name], args.batch) for name in tqdm(args.models, desc="models")]
    table = markdown(rows)
    print(table)
    info = {**run_info(torch.device("cpu")), "batch": args.batch, "config": division.DivisionConfig().to_dict()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"convert_model on torchvision video classifiers, {info['device']}, torch {info['torch']}, git {info['git']}\n\n"
        f"`{info['command']}`\n\nActivation memory of one training forward (division.summary: each storage once, "
        f"parameters left out), random weights, default DivisionConfig (B = 8, Q = 2); the last column: the "
        f"converted model's largest savers by kind of layer, MiB.\n\n{table}\n"
    )
    plot(rows, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
