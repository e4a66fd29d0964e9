"""Activation memory of a Vision Transformer per layer kind, stock against DIVISION, one batch.

    python benchmarks/vit_memory.py --out logs/bench/vit_memory                # vit_b_16, bs 8, 224 px
    python benchmarks/vit_memory.py --model vit_small --size 32 --out /tmp/vm  # the small ViT
    python benchmarks/vit_memory.py --keep-attention --out ...                # compress_attention=False

One training-mode forward of the stock model and one of the converted model (same weights, same
input) under saved-tensor hooks (division.saved.SavedBytes: each storage once, parameters left
out). Each saved tensor is attributed to a layer kind: the innermost module running when it was
saved; attention counts its projections' inputs and what scaled_dot_product_attention saves
(q, k, v, its output and statistics; given apart too). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import division
import models
from benchmarks.common import run_info
from division.saved import SavedBytes

MIB = 2**20
KINDS = {nn.Linear: "Linear", nn.LayerNorm: "LayerNorm", nn.GELU: "GELU", nn.Dropout: "Dropout",
         nn.MultiheadAttention: "attention", nn.Conv2d: "patch embedding (Conv2d)"}
INTERNALS = "attention internals (SDPA)"


@contextlib.contextmanager
def tagging_attention(tags: list[str]) -> Iterator[None]:
    """Marks what is saved while scaled_dot_product_attention runs (stock's attention calls it
    through torch.nn.functional's global, as the converted one does)."""
    real = F.scaled_dot_product_attention

    def tagged(*args, **kwargs):  # type: ignore[no-untyped-def]
        tags.append(INTERNALS)
        try:
            return real(*args, **kwargs)
        finally:
            tags.pop()

    F.scaled_dot_product_attention = tagged
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def kind_of(module: nn.Module) -> str:
    return next((name for cls, name in KINDS.items() if isinstance(module, cls)), "other")


def saved_per_kind(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    tags: list[str] = []
    handles = []

    def leave(module: nn.Module, args: object, output: object) -> None:
        tags.pop()

    for module in model.modules():
        if next(module.children(), None) is None or isinstance(module, nn.MultiheadAttention):
            kind = kind_of(module)
            handles.append(module.register_forward_pre_hook(lambda m, a, k=kind: tags.append(k)))
            handles.append(module.register_forward_hook(leave))
    counter = SavedBytes(exclude=list(model.parameters()), owner=lambda: tags[-1] if tags else "other")
    model.train()
    with counter.counting(), tagging_attention(tags):
        out = model(x)
    for h in handles:
        h.remove()
    del out
    return counter.per_owner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b_16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--keep-attention", action="store_true",
                        help="compress_attention=False: attention keeps what SDPA saves")
    parser.add_argument("--out", type=Path, help="output path without extension")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    stock = models.build_model(args.model, num_classes=1000)
    cfg = division.DivisionConfig(block_size=args.block_size, hfc_bits=args.bits,
                                  compress_attention=not args.keep_attention)
    converted = division.convert_model(copy.deepcopy(stock), cfg)
    x = torch.randn(args.batch, 3, args.size, args.size)
    before, after = saved_per_kind(stock, x), saved_per_kind(converted, x)
    internals = {"stock": before.get(INTERNALS, 0), "division": after.get(INTERNALS, 0)}
    for per_kind in (before, after):  # one attention row: its projections and what SDPA keeps
        per_kind["attention"] = per_kind.get("attention", 0) + per_kind.pop(INTERNALS, 0)
    kinds = sorted(set(before) | set(after), key=lambda k: -before.get(k, 0))
    rows = [{"kind": k, "stock_bytes": before.get(k, 0), "division_bytes": after.get(k, 0)} for k in kinds]
    total = {"kind": "total", "stock_bytes": sum(before.values()), "division_bytes": sum(after.values())}
    lines = ["| layer kind | stock MiB | DIVISION MiB | x smaller |", "|---|---|---|---|"]
    for r in [*rows, total]:
        ratio = r["stock_bytes"] / r["division_bytes"] if r["division_bytes"] else float("inf")
        lines.append(f"| {r['kind']} | {r['stock_bytes'] / MIB:.2f} | {r['division_bytes'] / MIB:.2f} | {ratio:.1f} |")
    lines += ["", f"Of the attention rows, what scaled_dot_product_attention itself saves (q, k, v, its output "
              f"and statistics): stock {internals['stock'] / MIB:.2f} MiB, DIVISION {internals['division'] / MIB:.2f} "
              + ("MiB (compress_attention=False: as stock)." if args.keep_attention else
                 "MiB (DIVISION keeps q, k and v as token records instead and recomputes the attention in backward).")]
    table = "\n".join(lines)
    print(table)
    if args.out:
        info = run_info(torch.device("cpu"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(
            {**info, "model": args.model, "batch": args.batch, "size": args.size, "config": cfg.to_dict(),
             "rows": rows, "total": total, "sdpa_internals_bytes": internals}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(
            f"Activation memory of {args.model}, batch {args.batch}, {args.size}x{args.size}, fp32, B={args.block_size} "
            f"Q={args.bits}, on {info['device']}, git {info['git']}, {info['date']}\n\n`{info['command']}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
