"""Bandwidth of DIVISION's compress and decompress next to a device-to-device copy, in one run.

    python benchmarks/kernels.py --out logs/bench/kernels.json          # GPU, ResNet-50 bs 256 shapes
    python benchmarks/kernels.py --device cpu --tiny --out /tmp/k.json   # CPU smoke test (reference)

For each ResNet-50 activation shape at batch 256, fp32 and bf16, NCHW and NHWC: GB/s of compress
(input read + packed bytes written), decompress (packed read + output written) and x.clone()
(2x the tensor), timed with CUDA events after a warm-up, median of repeats. On a GPU with the
extension built, the codec runs the fused kernels; otherwise the pure-PyTorch reference (slower).
Writes a JSON file (device, versions, git hash, command) and prints a markdown table with each
kernel's bandwidth as a fraction of the copy's.
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

RESNET50_SHAPES = [(256, 64, 112, 112), (256, 64, 56, 56), (256, 256, 56, 56), (256, 128, 28, 28),
                   (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
TINY_SHAPES = [(4, 8, 16, 16), (4, 16, 7, 7)]


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of fn(), synchronised; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(shapes: list[tuple[int, ...]], device: torch.device, repeats: int, cfg: division.DivisionConfig) -> list[dict]:
    rows = []
    for shape, dtype, layout in itertools.product(shapes, [torch.float32, torch.bfloat16], ["NCHW", "NHWC"]):
        x = torch.randn(shape, device=device, dtype=dtype)
        if layout == "NHWC":
            x = x.contiguous(memory_format=torch.channels_last)
        packed = division.compress(x, cfg, seed=1)
        in_bytes, packed_bytes = x.numel() * x.element_size(), packed.nbytes
        t_copy = timed(lambda x=x: x.clone(), device, repeats)
        t_comp = timed(lambda x=x: division.compress(x, cfg, seed=1), device, repeats)
        t_decomp = timed(lambda p=packed: division.decompress(p), device, repeats)
        copy_gbs = 2 * in_bytes / t_copy / 1e9
        comp_gbs = (in_bytes + packed_bytes) / t_comp / 1e9
        decomp_gbs = (in_bytes + packed_bytes) / t_decomp / 1e9
        rows.append({
            "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "layout": layout,
            "input_mb": in_bytes / 1e6, "packed_mb": packed_bytes / 1e6, "ratio": in_bytes / packed_bytes,
            "copy_gbs": copy_gbs, "compress_gbs": comp_gbs, "decompress_gbs": decomp_gbs,
            "compress_vs_copy": comp_gbs / copy_gbs, "decompress_vs_copy": decomp_gbs / copy_gbs,
            "compress_ms": t_comp * 1e3, "decompress_ms": t_decomp * 1e3, "copy_ms": t_copy * 1e3,
        })
        del x, packed
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| shape | dtype | layout | ratio | copy GB/s | compress GB/s (x copy) | decompress GB/s (x copy) |"
    out = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | {r['ratio']:.1f} | "
            f"{r['copy_gbs']:.3g} | {r['compress_gbs']:.3g} ({r['compress_vs_copy']:.2f}) | "
            f"{r['decompress_gbs']:.3g} ({r['decompress_vs_copy']:.2f}) |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = division.DivisionConfig(block_size=args.block_size, hfc_bits=args.bits)
    rows = bench(TINY_SHAPES if args.tiny else RESNET50_SHAPES, device, args.repeats, cfg)
    backend = "cuda kernels" if device.type == "cuda" and division.cuda_extension_available() else "torch reference"
    table = markdown(rows)
    print(f"codec: {backend}, B={cfg.block_size}, Q={cfg.hfc_bits}\n\n{table}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {**run_info(device), "codec": backend, "config": cfg.to_dict(), "rows": rows, "table": table}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
