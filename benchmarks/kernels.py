"""Bandwidth of DIVISION's kernels next to a device copy and stock PyTorch, in one run.

    python benchmarks/kernels.py --out logs/bench/kernels                    # GPU: ResNet-50, batch 256
    python benchmarks/kernels.py --device cpu --tiny --out /tmp/kernels      # CPU smoke test (twin)

Codec: for each ResNet-50 activation shape at batch 256, float32 and bfloat16, NCHW and NHWC
(channels_last): GB/s of compress (input bytes read + packed bytes written), decompress (packed
bytes read + output written) and x.clone() (2x the tensor's bytes), each the median of --repeats
timed calls after a warm-up (CUDA events on a GPU), and each as a fraction of the copy's GB/s (the
kernels issue's target: 0.7). The plan each shape ran with is recorded: the staged compress stages
G planes per block in S bytes of shared memory and reads x once; the generic one reads it up to
three times (--smem-targets times the staged kernel with other staging budgets, for tuning).
Masks and pooling: the fused ReLU (y and its 1-bit mask), its backward, and the stem's
3x3/2 max pooling forward and backward, next to stock's relu_ / threshold_backward /
max_pool2d_with_indices and its backward on the same tensors.

Without division._C the codec rows time the pure-PyTorch reference and the mask rows are left out.
Writes <out>.json (rows, device, versions, git hash, command), <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import division
from benchmarks.common import figure, run_info
from division.backend import load_extension

RESNET50_SHAPES = [
    (256, 3, 224, 224),  # the input batch (the stem conv's saved input)
    (256, 64, 112, 112),  # stem output
    (256, 64, 56, 56),  # layer1 bottleneck inside
    (256, 256, 56, 56),  # layer1 output
    (256, 512, 28, 28),  # layer2 output
    (256, 1024, 14, 14),  # layer3 output
    (256, 2048, 7, 7),  # layer4 output
]
TINY_SHAPES = [(4, 8, 16, 16), (4, 16, 7, 7), (2, 8, 14, 14), (2, 4, 13, 11)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
POOL = dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), ceil_mode=False)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of fn() after `warmup` untimed calls; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plan(x: torch.Tensor, cfg: division.DivisionConfig) -> str:
    """The compress kernel and its shape for x: 'staged G=.. S=..KB v.. r.. [split K]' (planes per
    block, shared memory, elements per global load, elements per code-phase run, blocks of a
    cluster that splits the planes) or 'generic T x G'."""
    module, _ = load_extension()
    if module is None:
        return "reference"
    path, a, b, _, vec, run, ranks = module.compress_plan(x, cfg.block_size, cfg.hfc_bits)
    if path == "staged":
        return f"staged G={a} {b / 1024:.0f}KB v{vec} r{run}" + (f" split {ranks}" if ranks > 1 else "")
    return f"generic {a}x{b}"


def decompress_plan(x: torch.Tensor, cfg: division.DivisionConfig) -> str:
    """The decompress kernel for x's shape and layout: 'word 16 runs', 'vec 8', 'channel 128', 'tile', ..."""
    module, _ = load_extension()
    if module is None:
        return "reference"
    channels_last = x.dim() >= 4 and not x.is_contiguous()
    path, per_thread, runs = module.decompress_plan(list(x.shape), x.dtype, channels_last, cfg.block_size, cfg.hfc_bits)
    return f"{path} {per_thread}" + (" runs" if runs else "")


def codec_row(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: torch.device,
    repeats: int, cfg: division.DivisionConfig,
) -> dict:
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    seed = torch.tensor(1, device=device)
    packed = division.compress(x, cfg, seed=seed)
    in_bytes = x.numel() * x.element_size()
    moved = in_bytes + packed.nbytes  # compress: x read + packed written; decompress: reverse
    t_copy = timed(lambda: x.clone(), device, repeats)
    t_comp = timed(lambda: division.compress(x, cfg, seed=seed), device, repeats)
    t_decomp = timed(lambda: division.decompress(packed), device, repeats)
    row = {
        "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "layout": layout,
        "codec": packed.backend, "plan": plan(x, cfg), "decompress_plan": decompress_plan(x, cfg),
        "input_mb": in_bytes / 1e6, "packed_mb": packed.nbytes / 1e6, "ratio": in_bytes / packed.nbytes,
        "copy_ms": t_copy * 1e3, "compress_ms": t_comp * 1e3, "decompress_ms": t_decomp * 1e3,
        "copy_gbs": 2 * in_bytes / t_copy / 1e9,
        "compress_gbs": moved / t_comp / 1e9, "decompress_gbs": moved / t_decomp / 1e9,
    }
    row["compress_vs_copy"] = row["compress_gbs"] / row["copy_gbs"]
    row["decompress_vs_copy"] = row["decompress_gbs"] / row["copy_gbs"]
    return row


def mask_rows(shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: torch.device, repeats: int) -> list[dict]:
    """Fused ReLU and max pooling (forward and backward) next to stock on the same tensors."""
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    fmt, nbytes = LAYOUTS[layout], x.numel() * x.element_size()
    ops = torch.ops.division
    y, bits = ops.relu_pack(x)
    grad = torch.randn_like(y)
    pool_args = [list(POOL[k]) if isinstance(POOL[k], tuple) else POOL[k] for k in
                 ("kernel_size", "stride", "padding", "dilation", "ceil_mode")]
    py, offsets = ops.max_pool2d(x, *pool_args)
    pgrad = torch.randn_like(py)
    _, indices = F.max_pool2d(x, *pool_args, return_indices=True)
    mask_bytes = bits.numel()
    cases = [
        # (what, ours, stock, bytes ours moves, bytes stock moves)
        ("relu forward (y + mask)", lambda: ops.relu_pack(x), lambda: torch.relu(x),
         2 * nbytes + mask_bytes, 2 * nbytes),
        ("relu backward", lambda: ops.relu_backward(grad, bits),
         lambda: torch.ops.aten.threshold_backward(grad, y, 0), 2 * nbytes + mask_bytes, 3 * nbytes),
        ("max_pool2d 3x3/2 forward", lambda: ops.max_pool2d(x, *pool_args),
         lambda: F.max_pool2d(x, *pool_args, return_indices=True),
         nbytes + py.numel() * py.element_size() + offsets.numel(),
         nbytes + py.numel() * (py.element_size() + 8)),
        ("max_pool2d 3x3/2 backward",
         lambda: ops.max_pool2d_backward(pgrad, offsets, list(x.shape), *pool_args, fmt == torch.channels_last),
         lambda: torch.ops.aten.max_pool2d_with_indices_backward(pgrad, x, *pool_args, indices),
         nbytes + py.numel() * py.element_size() + offsets.numel(),
         nbytes + py.numel() * (py.element_size() + 8)),
    ]
    rows = []
    for what, ours, stock, ours_bytes, stock_bytes in cases:
        t_ours, t_stock = timed(ours, device, repeats), timed(stock, device, repeats)
        rows.append({
            "op": what, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "layout": layout,
            "ms": t_ours * 1e3, "stock_ms": t_stock * 1e3, "gbs": ours_bytes / t_ours / 1e9,
            "stock_gbs": stock_bytes / t_stock / 1e9, "speedup": t_stock / t_ours,
        })
    return rows


def target_rows(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: torch.device, repeats: int,
    cfg: division.DivisionConfig, targets: list[int],
) -> list[dict]:
    """compress GB/s of the staged kernel for several shared-memory targets (planes per block)."""
    module, _ = load_extension()
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    seed = torch.tensor(1, device=device)
    args = (x, seed, cfg.block_size, cfg.hfc_bits, cfg.lfc_torch_dtype, "division")
    moved = x.numel() * x.element_size() + division.compress(x, cfg, seed=seed).nbytes
    rows = []
    for target in targets:
        path, planes, smem, _, _, _, _ = module.compress_plan(x, cfg.block_size, cfg.hfc_bits, smem_target=target)
        if path != "staged":
            continue
        t = timed(lambda target=target: module._compress_with(*args, path="staged", smem_target=target), device, repeats)
        rows.append({"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "layout": layout,
                     "target_kb": target / 1024, "planes": planes, "smem_kb": smem / 1024,
                     "compress_gbs": moved / t / 1e9})
    return rows


def decompress_path_rows(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: torch.device, repeats: int,
    cfg: division.DivisionConfig,
) -> list[dict]:
    """decompress GB/s of every kernel that can write the layout (word, staged through shared
    memory, word_direct and the vec kernel they replace where planes are whole code words; plane
    and vec where the plan takes plane (7x7); plane_words and vec where it takes plane_words
    (14x14); or channel and the tile transpose it replaced; and generic), so that a GPU run
    compares them on the same data."""
    module, _ = load_extension()
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    packed = division.compress(x, cfg, seed=torch.tensor(1, device=device))
    moved = x.numel() * x.element_size() + packed.nbytes
    channels_last = layout != "NCHW"
    parts = packed.tensors()[:5]  # mode division: all present
    paths = ["tile", "channel", "generic"] if channels_last else ["word", "word_direct", "plane", "plane_words", "vec", "generic"]
    if channels_last and shape[1] % (16 // x.element_size()) != 0:
        paths.remove("channel")
    chosen = decompress_plan(x, cfg).split()[0]  # word and plane: only where the plan takes them
    if not channels_last and chosen != "word":
        paths = [p for p in paths if not p.startswith("word")]
    if not channels_last and chosen != "plane":
        paths.remove("plane")
    if not channels_last and chosen != "plane_words":
        paths.remove("plane_words")
    rows = []
    for path in paths:
        def call(path: str = path) -> torch.Tensor:
            return module._decompress_with(*parts, list(shape), dtype, channels_last, cfg.block_size,
                                           cfg.hfc_bits, "division", path=path)

        t = timed(call, device, repeats)
        rows.append({"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "layout": layout,
                     "path": path, "decompress_gbs": moved / t / 1e9})
    return rows


def decompress_path_table(rows: list[dict]) -> str:
    out = ["| shape | dtype | layout | decompress path | GB/s |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | {r['path']} "
                   f"| {gbs(r['decompress_gbs'])} |")
    return "\n".join(out)


def target_table(rows: list[dict]) -> str:
    out = ["| shape | dtype | layout | target KB | planes per block | shared KB | compress GB/s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | {r['target_kb']:.0f} "
                   f"| {r['planes']} | {r['smem_kb']:.1f} | {gbs(r['compress_gbs'])} |")
    return "\n".join(out)


def gbs(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def codec_table(rows: list[dict]) -> str:
    out = ["| shape | dtype | layout | ratio | copy GB/s | compress GB/s (x copy) | decompress GB/s (x copy) "
           "| compress plan | decompress plan |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | {r['ratio']:.1f} "
            f"| {gbs(r['copy_gbs'])} | {gbs(r['compress_gbs'])} ({r['compress_vs_copy']:.2f}) "
            f"| {gbs(r['decompress_gbs'])} ({r['decompress_vs_copy']:.2f}) | {r['plan']} "
            f"| {r.get('decompress_plan', '')} |"
        )
    return "\n".join(out)


def mask_table(rows: list[dict]) -> str:
    out = ["| op | shape | dtype | layout | ms (GB/s) | stock ms (GB/s) | x faster |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} "
            f"| {r['ms']:.3f} ({gbs(r['gbs'])}) | {r['stock_ms']:.3f} ({gbs(r['stock_gbs'])}) | {r['speedup']:.2f} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    groups = sorted({(r["dtype"], r["layout"]) for r in rows})
    with figure(path, 1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False) as (_, axes):
        for ax, (dtype, layout) in zip(axes[0], groups):
            sel = [r for r in rows if r["dtype"] == dtype and r["layout"] == layout]
            labels = ["x".join(map(str, r["shape"][1:])) for r in sel]
            pos = range(len(sel))
            ax.bar([p - 0.2 for p in pos], [r["compress_vs_copy"] for r in sel], 0.4, label="compress")
            ax.bar([p + 0.2 for p in pos], [r["decompress_vs_copy"] for r in sel], 0.4, label="decompress")
            ax.axhline(0.7, color="k", ls="--", lw=1, label="target 0.7")
            ax.set_xticks(list(pos), labels, rotation=45, ha="right")
            ax.set_ylabel("GB/s as a fraction of a device copy's")
            ax.set_title(f"{dtype}, {layout}")
            ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--smem-targets", nargs="*", type=int, default=[],
                        help="also time the staged compress with these shared-memory targets (bytes per block)")
    parser.add_argument("--decompress-paths", action="store_true",
                        help="also time every decompress kernel that can write each shape's layout")
    parser.add_argument("--out", type=Path, help="output path without extension")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = division.DivisionConfig(block_size=args.block_size, hfc_bits=args.bits)
    shapes = TINY_SHAPES if args.tiny else RESNET50_SHAPES
    rows: list[dict] = []
    for shape, dtype, layout in itertools.product(shapes, args.dtypes, args.layouts):
        rows.append(codec_row(shape, DTYPES[dtype], layout, device, args.repeats, cfg))
        r = rows[-1]
        print(f"  {shape} {dtype} {layout}: compress {r['compress_gbs']:.1f} GB/s, decompress "
              f"{r['decompress_gbs']:.1f} GB/s, copy {r['copy_gbs']:.1f} GB/s [{r['plan']}]", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next shape's tensors may not fit beside these
    masks: list[dict] = []
    if load_extension()[0] is not None:
        mask_shape = shapes[0] if args.tiny else (256, 64, 112, 112)  # the stem output: ReLU, then max-pool
        for dtype, layout in itertools.product(args.dtypes, args.layouts):
            masks += mask_rows(mask_shape, DTYPES[dtype], layout, device, args.repeats)
    targets: list[dict] = []
    if args.smem_targets and load_extension()[0] is not None:
        for shape, dtype, layout in itertools.product(shapes, args.dtypes, args.layouts):
            targets += target_rows(shape, DTYPES[dtype], layout, device, args.repeats, cfg, args.smem_targets)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    paths: list[dict] = []
    if args.decompress_paths and load_extension()[0] is not None:
        for shape, dtype, layout in itertools.product(shapes, args.dtypes, args.layouts):
            paths += decompress_path_rows(shape, DTYPES[dtype], layout, device, args.repeats, cfg)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    codecs = sorted({r["codec"] for r in rows})
    text = (f"device: {run_info(device)['device']}; codec: {', '.join(codecs)}; B={cfg.block_size}, "
            f"Q={cfg.hfc_bits}, LFC {cfg.lfc_dtype}\n\n{codec_table(rows)}\n")
    if masks:
        text += f"\n{mask_table(masks)}\n"
    if targets:
        text += f"\n{target_table(targets)}\n"
    if paths:
        text += f"\n{decompress_path_table(paths)}\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        info = run_info(device)
        result = {**info, "config": cfg.to_dict(), "repeats": args.repeats,
                  "bytes": "compress: input + packed; decompress: packed + output; copy: 2x input",
                  "rows": rows, "mask_rows": masks, "smem_target_rows": targets,
                  "decompress_path_rows": paths}
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(
            f"Kernel bandwidth on {info['device']}, torch {info['torch']}, git {info['git']}, {info['date']}\n\n"
            f"`{info['command']}`\n\n{text}")
        plot(rows, args.out.with_suffix(".png"))
        print(f"wrote {args.out}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
