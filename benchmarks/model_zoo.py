"""What convert_model saves on torchvision's classifiers, and how near the exact gradient it stays.

    python benchmarks/model_zoo.py --out logs/bench/model_zoo
    python benchmarks/model_zoo.py --models efficientnet_b0 --activation-bits 2 --out /tmp/zoo2
    python benchmarks/model_zoo.py --models maxvit_t --hfc-bits 4 --out /tmp/zoo4
    python benchmarks/model_zoo.py --models maxvit_t --layer-bits 'blocks.*_attention=4' --out /tmp/zoo_attn4
    python benchmarks/model_zoo.py --models resnet18 mobilenet_v2 --tiny --out /tmp/zoo   # smoke test
    python benchmarks/model_zoo.py --timm --out logs/bench/model_zoo_timm   # timm's classifiers

For each model (random weights, 10 classes): the activation memory autograd saves for one
training-mode forward (division.summary: each storage once, parameters left out) of the stock
model, of the model with only the paper's layers converted (convolution, batch norm, ReLU,
max-pool, dropout, Linear) and of the model as convert_model leaves it today (also ReLU6 and
Hardtanh masks, SiLU / Hardswish / Mish inputs and those of GELUs after convolutions at
activation_bits, average pooling, Inception's and GoogLeNet's conv blocks, squeeze-and-excitation,
ConvNeXt, Swin and MaxViT blocks); and
the cosine between the whole-model gradient and the exact one, on real Fashion-MNIST images
(upsampled, three channels), mean and range over --draws draws. Dropout and stochastic depth are
switched off, so that the gradients compared differ by the codec alone. Writes <out>.json,
<out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm import tqdm

import data
import division
from benchmarks.common import add_plan_arguments, figure, plan_text, run_info
from division.layers import CONVERSIONS, DivisionLayer

MODELS = ["resnet50", "densenet121", "googlenet", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "regnet_y_400mf", "convnext_tiny", "swin_t", "swin_v2_t", "maxvit_t"]
BUILD_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}  # one output in training mode
FIXED_SIZE = {"maxvit_t": 224, "efficientformer_l1": 224}  # built for one image size (partition grids, attention biases)
# what the paper's method converts; the rest of CONVERSIONS came later
PAPER_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.MaxPool2d,
                nn.Dropout, nn.Linear)
RANDOM_LAYERS = ("Dropout", "StochasticDepth")


def without_randomness(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if type(module).__name__ in RANDOM_LAYERS:
            module.p = 0.0
        elif type(module).__name__ == "DropPath":  # timm's stochastic depth
            module.drop_prob = 0.0
    return model


def paper_layers_only(model: nn.Module) -> nn.Module:
    """The converted model with every layer the paper does not convert put back to stock: the
    other activations, the blocks that convert a multiply of their own (their paper layers stay
    converted) and the Linears of ConvNeXt's maps (the paper keeps Linear inputs exact)."""
    for module in reversed(list(model.modules())):  # children first: a reverted block copies its children dict
        for name, child in list(module.named_children()):
            paper = any(type(child) is CONVERSIONS[k] for k in PAPER_LAYERS) and getattr(child, "map_layout", None) is None
            if isinstance(child, DivisionLayer) and not paper:
                setattr(module, name, division.revert_model(child, recurse=False))
    return model


def load_images(batch: int, size: int, tiny: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if tiny:
        _, val, _ = data.build_datasets("synthetic", num_train=8, num_val=batch, image_size=32, num_classes=10, seed=0)
    else:
        _, val, _ = data.build_datasets("fashion_mnist", None)
    idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:batch].tolist()
    xs, ys = zip(*(val[i] for i in idx))
    x = F.interpolate(torch.stack(xs), size=size, mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.tensor(ys)


def flat_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])


TIMM_MODELS = ["efficientnet_b0", "regnety_008", "mobilenetv3_large_100", "cspdarknet53", "densenet121",
               "repvgg_a2", "ese_vovnet19b_dw", "resnet50"]


def build_model(name: str, library: str) -> nn.Module:
    """A classifier with random weights and 10 classes, from torchvision or timm (dropout and
    stochastic depth off: the gradients compared differ by the codec alone)."""
    if library == "timm":
        import timm

        return without_randomness(timm.create_model(name, num_classes=10))
    return without_randomness(torchvision.models.get_model(name, num_classes=10, **BUILD_KWARGS.get(name, {})))


def measure(name: str, x: torch.Tensor, y: torch.Tensor, memory_x: torch.Tensor, draws: int,
            cfg: division.DivisionConfig, library: str = "torchvision") -> dict[str, Any]:
    torch.manual_seed(0)
    stock = build_model(name, library)
    exact = flat_grad(stock, x, y, 0)
    row: dict[str, Any] = {"model": name}
    for variant in ("paper layers", "all layers"):
        model = division.convert_model(copy.deepcopy(stock), cfg)
        if variant == "paper layers":
            paper_layers_only(model)
        report = division.summary(model, memory_x)
        cosines = [F.cosine_similarity(flat_grad(model, x, y, s), exact, dim=0).item() for s in range(draws)]
        row[variant] = {
            "converted": sum(r.converted for r in report.rows), "kept": sum(not r.converted for r in report.rows),
            "saved_mib": report.total_saved_bytes / 2**20, "ratio": report.ratio,
            "cosine_mean": statistics.mean(cosines), "cosine_min": min(cosines), "cosine_max": max(cosines),
        }
        row["stock_mib"] = report.total_vanilla_bytes / 2**20
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| model | stock MiB | paper's layers: MiB (x smaller) | gradient cosine | all converted: MiB (x smaller) | gradient cosine |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["model"], f"{r['stock_mib']:.1f}"]
        for v in ("paper layers", "all layers"):
            e = r[v]
            cells += [f"{e['saved_mib']:.1f} ({e['ratio']:.1f}x)",
                      f"{e['cosine_mean']:.3f} ({e['cosine_min']:.3f}-{e['cosine_max']:.3f})"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    with figure(path, 1, 2, figsize=(11, 3.8)) as (_, axes):
        names = [r["model"] for r in rows]
        width = 0.4
        for i, v in enumerate(("paper layers", "all layers")):
            offsets = [k + (i - 0.5) * width for k in range(len(rows))]
            axes[0].bar(offsets, [r[v]["ratio"] for r in rows], width, label=v)
            axes[1].bar(offsets, [r[v]["cosine_mean"] for r in rows], width, label=v)
        axes[0].set_ylabel("activation memory, x smaller than stock")
        axes[1].set_ylabel("gradient cosine to the exact one")
        for ax in axes:
            ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help=f"default: {' '.join(MODELS)} (with --timm: {' '.join(TIMM_MODELS)})")
    parser.add_argument("--timm", action="store_true", help="the models are timm's (pip install timm)")
    parser.add_argument("--size", type=int, default=64, help="image side of the gradient batch")
    parser.add_argument("--batch", type=int, default=16, help="images in the gradient batch")
    parser.add_argument("--memory-size", type=int, default=224, help="image side of the memory batch")
    parser.add_argument("--memory-batch", type=int, default=2,
                        help="images in the memory batch (more where weight-sized tensors saved for backward, "
                             "as weight-standardized convolutions save, would hide the activations)")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--activation-bits", type=int, default=division.DivisionConfig().activation_bits,
                        help="DivisionConfig.activation_bits (SiLU, Hardswish, Mish inputs)")
    parser.add_argument("--hfc-bits", type=int, default=division.DivisionConfig().hfc_bits,
                        help="DivisionConfig.hfc_bits (Q of every other record)")
    add_plan_arguments(parser)
    parser.add_argument("--tiny", action="store_true", help="smoke test: synthetic images, 32 px, 2 draws")
    parser.add_argument("--out", type=Path, required=True, help="output path without extension")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.batch, args.memory_size, args.draws = 32, 4, 32, 2
    library = "timm" if args.timm else "torchvision"
    args.models = args.models or (TIMM_MODELS if args.timm else MODELS)
    cfg = division.DivisionConfig(hfc_bits=args.hfc_bits, activation_bits=args.activation_bits,
                                  layer_bits=args.layer_bits, exclude=args.exclude)
    rows = []
    for name in tqdm(args.models, desc="models"):
        size, memory_size = (FIXED_SIZE[name],) * 2 if name in FIXED_SIZE else (args.size, args.memory_size)
        x, y = load_images(args.batch, size, args.tiny)
        memory_x = torch.randn(args.memory_batch, 3, memory_size, memory_size, generator=torch.Generator().manual_seed(1))
        rows.append(measure(name, x, y, memory_x, args.draws, cfg, library))
    table = markdown(rows)
    print(table)
    fixed = " ".join(f"{n} is built for {FIXED_SIZE[n]}x{FIXED_SIZE[n]} images: both its batches are at that size."
                     for n in args.models if n in FIXED_SIZE)
    info = {**run_info(torch.device("cpu")), "size": args.size, "batch": args.batch, "fixed_size": FIXED_SIZE,
            "memory_size": args.memory_size, "memory_batch": args.memory_batch, "draws": args.draws,
            "config": cfg.to_dict(), "library": library}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"convert_model on {library} classifiers, {info['device']}, torch {info['torch']}, git {info['git']}\n\n"
        f"`{info['command']}`\n\nActivation memory of one training forward, batch {args.memory_batch}, {args.memory_size}x"
        f"{args.memory_size}; gradient cosine to the exact gradient over all parameters, {args.batch} "
        f"Fashion-MNIST images at {args.size}x{args.size} (mean and range of {args.draws} draws), random "
        f"weights, dropout and stochastic depth off. \"paper's layers\": convolution, batch norm, ReLU, "
        f"max-pool, dropout converted; \"all converted\": what convert_model converts "
        f"(hfc_bits={cfg.hfc_bits}, activation_bits={cfg.activation_bits}{plan_text(cfg)}).{' ' + fixed if fixed else ''}"
        f"\n\n{table}\n"
    )
    plot(rows, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
