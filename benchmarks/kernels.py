"""Bandwidth of DIVISION's compress and decompress next to a device-to-device copy, in one run.

    python benchmarks/kernels.py --out logs/bench/kernels.json           # GPU: ResNet-50, batch 256
    python benchmarks/kernels.py --device cpu --tiny --out /tmp/k.json    # CPU smoke test (reference)

For each ResNet-50 activation shape at batch 256, in float32 and bfloat16, NCHW and NHWC
(channels_last): GB/s of compress (input bytes read + packed bytes written), decompress (packed
bytes read + output bytes written) and x.clone() (2x the tensor's bytes), each the median of
--repeats timed calls after a warm-up, timed with CUDA events on a GPU. On a GPU with division._C
built, the codec runs the CUDA kernels (the launch shapes they use are recorded per row);
otherwise the pure-PyTorch reference. `--with-reference` adds the reference's timings on the same
device. Prints a markdown table (each kernel's bandwidth also as a fraction of the copy's) and
writes JSON with the device, versions, git hash and command.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import division  # noqa: E402
from benchmarks.common import run_info  # noqa: E402
from division.backend import load_extension  # noqa: E402

RESNET50_SHAPES = [
    (256, 64, 112, 112),  # stem output
    (256, 64, 56, 56),  # layer1 bottleneck inside
    (256, 256, 56, 56),  # layer1 output
    (256, 512, 28, 28),  # layer2 output
    (256, 1024, 14, 14),  # layer3 output
    (256, 2048, 7, 7),  # layer4 output
]
TINY_SHAPES = [(4, 8, 16, 16), (4, 16, 7, 7), (2, 4, 13, 11)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


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


def launch_shapes(shape: tuple[int, ...], layout: str, cfg: division.DivisionConfig) -> str:
    """'T x G' threads per plane x planes per block of the compress / decompress kernels."""
    module, _ = load_extension()
    if module is None:
        return ""
    (ct, cg, _), (dt, dg, _) = module.launch_shapes(
        list(shape), cfg.block_size, cfg.hfc_bits, layout == "NHWC"
    )
    return f"{ct}x{cg} / {dt}x{dg}"


def bench_one(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: torch.device,
    repeats: int, cfg: division.DivisionConfig, with_reference: bool,
) -> dict:
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    packed = division.compress(x, cfg, seed=1)
    in_bytes = x.numel() * x.element_size()
    moved = in_bytes + packed.nbytes  # compress: x read + packed written; decompress: reverse
    t_copy = timed(lambda: x.clone(), device, repeats)
    t_comp = timed(lambda: division.compress(x, cfg, seed=1), device, repeats)
    t_decomp = timed(lambda: division.decompress(packed), device, repeats)
    row = {
        "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "layout": layout,
        "codec": packed.backend,
        "launch": launch_shapes(shape, layout, cfg) if packed.backend == "cuda" else "",
        "input_mb": in_bytes / 1e6, "packed_mb": packed.nbytes / 1e6,
        "ratio": in_bytes / packed.nbytes,
        "copy_ms": t_copy * 1e3, "compress_ms": t_comp * 1e3, "decompress_ms": t_decomp * 1e3,
        "copy_gbs": 2 * in_bytes / t_copy / 1e9,
        "compress_gbs": moved / t_comp / 1e9,
        "decompress_gbs": moved / t_decomp / 1e9,
    }
    row["compress_vs_copy"] = row["compress_gbs"] / row["copy_gbs"]
    row["decompress_vs_copy"] = row["decompress_gbs"] / row["copy_gbs"]
    if with_reference and packed.backend == "cuda":
        ref_cfg = cfg.replace(backend="torch")
        ref_packed = division.compress(x, ref_cfg, seed=1)
        t_ref_c = timed(lambda: division.compress(x, ref_cfg, seed=1), device, max(3, repeats // 4))
        t_ref_d = timed(lambda: division.decompress(ref_packed), device, max(3, repeats // 4))
        row["reference_compress_gbs"] = moved / t_ref_c / 1e9
        row["reference_decompress_gbs"] = moved / t_ref_d / 1e9
    return row


def gbs(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def markdown(rows: list[dict]) -> str:
    with_ref = any("reference_compress_gbs" in r for r in rows)
    head = ("| shape | dtype | layout | ratio | copy GB/s | compress GB/s (x copy) "
            "| decompress GB/s (x copy) | launch C / D |")
    sep = "|---|---|---|---|---|---|---|---|"
    if with_ref:
        head += " reference compress / decompress GB/s |"
        sep += "---|"
    out = [head, sep]
    for r in rows:
        line = (
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | {r['ratio']:.1f} "
            f"| {gbs(r['copy_gbs'])} | {gbs(r['compress_gbs'])} ({r['compress_vs_copy']:.2f}) "
            f"| {gbs(r['decompress_gbs'])} ({r['decompress_vs_copy']:.2f}) | {r['launch']} |"
        )
        if with_ref:
            line += (f" {gbs(r.get('reference_compress_gbs', float('nan')))} / "
                     f"{gbs(r.get('reference_decompress_gbs', float('nan')))} |")
        out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--with-reference", action="store_true",
                        help="also time the pure-PyTorch reference on the same device")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = division.DivisionConfig(block_size=args.block_size, hfc_bits=args.bits)
    shapes = TINY_SHAPES if args.tiny else RESNET50_SHAPES
    rows = []
    for shape, dtype, layout in itertools.product(shapes, args.dtypes, args.layouts):
        rows.append(bench_one(shape, DTYPES[dtype], layout, device, args.repeats, cfg,
                              args.with_reference))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next shape's tensors may not fit beside these
        print(f"  {shape} {dtype} {layout}: compress {rows[-1]['compress_gbs']:.1f} GB/s, "
              f"decompress {rows[-1]['decompress_gbs']:.1f} GB/s, copy {rows[-1]['copy_gbs']:.1f} GB/s",
              file=sys.stderr)
    table = markdown(rows)
    codecs = sorted({r["codec"] for r in rows})
    print(f"device: {run_info(device)['device']}; codec: {', '.join(codecs)}; "
          f"B={cfg.block_size}, Q={cfg.hfc_bits}, LFC {cfg.lfc_dtype}\n\n{table}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {**run_info(device), "config": cfg.to_dict(), "repeats": args.repeats,
                  "bytes": "compress: input + packed; decompress: packed + output; copy: 2x input",
                  "rows": rows, "table": table}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
