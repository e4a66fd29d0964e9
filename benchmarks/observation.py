"""The paper's observation, measured: how close is the gradient computed from the LFC alone, the HFC
alone, or DIVISION's reconstruction to the exact one, per layer and for the whole model?

    python benchmarks/observation.py --checkpoint logs/runs/demo/.../last.pt --out logs/bench/observation
    python benchmarks/observation.py --tiny --out /tmp/obs            # CPU smoke test, synthetic data

On one batch of real images (Fashion-MNIST, ResNet-18 CIFAR variant or --model, e.g. vit_small), at
initialisation and with the weights of a trained checkpoint: forward is exact in every mode; backward
reconstructs each saved conv/BN input (for a ViT, each token input over the patch grid) from the LFC only (backward_mode=lfc_only), the quantized HFC only (hfc_only), or both
(division), for B in --blocks. Reported against the exact gradient (same batch, weights and batch
statistics): relative error |g' - g| / |g| and cosine, per layer and for all parameters together;
DIVISION's single draw and the mean of --draws draws; and the bytes the LFC and the HFC of those
inputs take. Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import data
import division
import models
from benchmarks.common import figure, run_info
from division.format import lfc_shape, plane_bytes
from division.tokens import infer_token_grid

MODES = ("lfc_only", "hfc_only", "division")


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None and p.dim() > 1}


def compare(approx: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> dict[str, Any]:
    def stats(a: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
        rel = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
        # rounding can put the cosine of equal vectors a few ulps above 1
        cos = min(1.0, max(-1.0, F.cosine_similarity(a.flatten().double(), e.flatten().double(), dim=0).item()))
        return rel, cos

    layers = {n: stats(approx[n], exact[n]) for n in exact}
    whole = stats(torch.cat([approx[n].flatten() for n in exact]), torch.cat([exact[n].flatten() for n in exact]))
    return {"rel_err": whole[0], "cosine": whole[1], "layers": {n: {"rel_err": r, "cosine": c} for n, (r, c) in layers.items()}}


def part_bytes(model: nn.Module, x: torch.Tensor, block: int, bits: int) -> dict[str, int]:
    """Bytes of the LFC (bf16) and of the HFC (codes + lo + step) of every conv/BN input, and of
    every transformer layer's token input over its patch grid (prefix tokens not counted)."""
    sizes = {"lfc": 0, "hfc": 0, "input_fp32": 0}
    handles = []
    grid = infer_token_grid(model)

    def hook(mod: nn.Module, args: tuple) -> None:
        t = args[0]
        if t.dim() == 4:
            (n, c), spatial = t.shape[:2], tuple(t.shape[2:])
        elif t.dim() == 3 and grid is not None and t.shape[1] == grid.length:
            (n, c), spatial = (t.shape[0], t.shape[2]), (grid.height, grid.width)
        else:
            return
        sizes["lfc"] += n * c * math.prod(lfc_shape(spatial, block)) * 2
        sizes["hfc"] += n * c * (plane_bytes(math.prod(spatial), bits) + 8)
        sizes["input_fp32"] += n * c * math.prod(spatial) * 4

    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.LayerNorm, nn.GELU, nn.MultiheadAttention)
    for m in model.modules():
        if type(m) in kinds:
            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sizes


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, blocks: list[int], bits: int, draws: int,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    extra = extra or {}
    exact = gradients(model, x, y)
    silent = [n for n, g in exact.items() if not g.any()]
    if len(silent) > len(exact) // 2:  # every mode would read cosine 1 on what is left
        raise SystemExit(
            f"observation: {len(silent)} of {len(exact)} weight tensors get an exact gradient of zero "
            f"(e.g. {silent[0]}: a zero-initialised head passes no gradient to the body); measure "
            "trained weights instead: --checkpoint RUN/last.pt --skip-initial"
        )
    result: dict[str, Any] = {}
    for block in blocks:
        for mode in MODES:
            cfg = division.DivisionConfig(block_size=block, hfc_bits=bits, backward_mode=mode, backend="torch", **extra)
            converted = division.convert_model(copy.deepcopy(model), cfg)
            torch.manual_seed(block)
            single = gradients(converted, x, y)
            entry = compare(single, exact)
            if mode == "division" and draws > 1:
                total = {k: v.clone() for k, v in single.items()}
                for _ in range(draws - 1):
                    for k, v in gradients(converted, x, y).items():
                        total[k] += v
                mean = compare({k: v / draws for k, v in total.items()}, exact)
                entry["mean_of_draws"] = {"draws": draws, "rel_err": mean["rel_err"], "cosine": mean["cosine"]}
            result[f"B{block}/{mode}"] = entry
        result[f"B{block}/bytes"] = part_bytes(model, x, block, bits)
    return result


def load_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, data.DatasetInfo]:
    if args.tiny:
        _, val, info = data.build_datasets("synthetic", num_train=8, num_val=args.batch, image_size=32, num_classes=10, seed=0)
    else:
        _, val, info = data.build_datasets("fashion_mnist", args.data_root)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(val), generator=g)[: args.batch].tolist()
    xs, ys = zip(*(val[i] for i in idx))
    return torch.stack(xs), torch.tensor(ys), info


def markdown(results: dict[str, dict[str, Any]], blocks: list[int]) -> str:
    out = ["| weights | B | gradient from | rel. error | cosine | DIVISION mean of draws (rel. err / cosine) |",
           "|---|---|---|---|---|---|"]
    for state, res in results.items():
        for block in blocks:
            for mode in MODES:
                e = res[f"B{block}/{mode}"]
                mean = e.get("mean_of_draws")
                extra = f"{mean['rel_err']:.3f} / {mean['cosine']:.3f} ({mean['draws']})" if mean else "-"
                out.append(f"| {state} | {block} | {mode} | {e['rel_err']:.3f} | {e['cosine']:.3f} | {extra} |")
    out += ["", "| B | LFC bytes | HFC bytes (Q bits + lo/step) | fp32 input bytes |", "|---|---|---|---|"]
    first = next(iter(results.values()))
    for block in blocks:
        b = first[f"B{block}/bytes"]
        out.append(f"| {block} | {b['lfc']:,} | {b['hfc']:,} | {b['input_fp32']:,} |")
    return "\n".join(out)


def plot(results: dict[str, dict[str, Any]], block: int, path: Path) -> None:
    with figure(path, 1, len(results), figsize=(6 * len(results), 4), squeeze=False) as (_, axes):
        for ax, (state, res) in zip(axes[0], results.items()):
            for mode in MODES:
                layers = res[f"B{block}/{mode}"]["layers"]
                ax.plot(range(len(layers)), [v["cosine"] for v in layers.values()], marker=".", label=mode)
            ax.set_title(f"{state} weights, B={block}\nper-layer gradient cosine to the exact one")
            ax.set_xlabel("layer (forward order)")
            ax.set_ylabel("cosine")
            ax.grid(alpha=0.3)
            ax.legend()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="last.pt of a trained run (its model weights are used)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--blocks", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--skip-initial", action="store_true",
                        help="only the checkpoint's weights (a ViT's zero-initialised head passes no gradient at init)")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="other DivisionConfig fields (true/false for booleans), e.g. compress_attention=false")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    extra = {k: {"true": True, "false": False}.get(v.lower(), v) for k, v in (kv.split("=", 1) for kv in args.config)}
    if args.tiny:
        args.batch, args.blocks, args.draws = 4, [4, 8], 2
    x, y, info = load_batch(args)
    torch.manual_seed(0)
    model = models.build_model(args.model, num_classes=info.num_classes, in_channels=info.in_channels)
    results = {} if args.skip_initial else {"initial": measure(model, x, y, args.blocks, args.bits, args.draws, extra)}
    if args.checkpoint:
        from harness import checkpoints

        state = checkpoints.load(args.checkpoint)
        model.load_state_dict(state["model"])
        results[f"trained ({state['epoch']} epochs, {state['step']} steps)"] = measure(model, x, y, args.blocks, args.bits, args.draws, extra)
    table = markdown(results, args.blocks)
    print(table)
    info_run = {**run_info(torch.device("cpu")), "data": info.name, "model": args.model, "batch": args.batch, "bits": args.bits,
                "checkpoint": str(args.checkpoint) if args.checkpoint else None, "config": extra}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**info_run, "results": results}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"observation on {info_run['device']}, {info.name}, {args.model}, batch {args.batch}, Q={args.bits}, "
        f"git {info_run['git']}, {info_run['date']}\n\n`{info_run['command']}`\n\n{table}\n")
    plot(results, 8 if 8 in args.blocks else args.blocks[0], args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
