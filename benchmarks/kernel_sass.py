"""Instructions per element of the codec kernels' hot loops, read from their sm_90 machine code.

    python benchmarks/kernel_sass.py --out logs/bench/kernel_sass

Runs without a GPU (nvcc and cuobjdump only). The kernels are bound by instruction issue, not
bytes, on the shapes the GPU run measured (bfloat16 took as long as float32 for the same element
count, logs/bench/gpu/NOTES.md), so the count of instructions per element is the figure that
predicts their speed before a GPU is at hand. Each probe of benchmarks/kernel_sass_probe.cu wraps
one phase; the script compiles them for sm_90, disassembles the cubin and walks the hot path of the
phase's loop: from the loop head along the fall-through of every conditional branch (the common
case the compiler lays out first: a full code word, a full run) to the loop's back branch. The
number of elements that path handles is counted from the machine code itself (one rounding add per
code, one float64 conversion per LFC element, two multiplies per reconstructed element), so an
unrolling choice of the compiler cannot skew the ratio. An H100 SM issues four warp instructions
per clock: at 100% issue, 1 instruction per element is 4 * 32 elements per clock per SM.
Writes <out>.json (rows, nvcc version, git hash, command), <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import figure, run_info

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "benchmarks" / "kernel_sass_probe.cu"


@dataclass(frozen=True)
class Probe:
    phase: str
    path: str
    dtype: str
    symbol: str  # a substring of the mangled kernel name
    marker: str  # regex of an instruction that occurs `per_element` times per element
    per_element: int
    innermost: bool  # walk the innermost loop holding the marker, else the outermost
    # a thread of three nested loops (work items, segments, elements): counted as one thread's
    # setup + `segments` segment heads + `iterations` passes of the innermost loop
    segments: int = 0
    iterations: int = 0


# channels_last decompress: a thread of 16 pixels (Q = 2) in 2 segments (B = 8 and W a multiple of
# 8); the innermost loop is one pixel (bfloat16: 8 channels) or, unrolled, two (float32: 4 each)
PROBES = [
    Probe("compress: codes", "runs of 4 (W, B multiples of 4)", "float32", "probe_codesIfLi2ELi4ELi0E", r"^FADD\.RM", 1, False),
    Probe("compress: codes", "runs of 4 (W, B multiples of 4)", "bfloat16", "probe_codesIN3c108BFloat16ELi2ELi4ELi0E", r"^FADD\.RM", 1, False),
    Probe("compress: codes", "pairs in one block, one load (W, B even: 14x14)", "float32", "probe_codesIfLi2ELi2ELi2E", r"^FADD\.RM", 1, False),
    Probe("compress: codes", "pairs in one block, one load (W, B even: 14x14)", "bfloat16", "probe_codesIN3c108BFloat16ELi2ELi2ELi2E", r"^FADD\.RM", 1, False),
    Probe("compress: codes", "pairs, the plane one LFC block (7x7)", "float32", "probe_codesIfLi2ELi2ELi1E", r"^FADD\.RM", 1, False),
    Probe("compress: codes", "pairs, each element looked up (other W, B)", "float32", "probe_codesIfLi2ELi2ELi0E", r"^FADD\.RM", 1, False),
    Probe("compress: LFC sums", "block rows in runs of 4", "float32", "probe_block_statsIfLi4E", r"^F2F\.F64", 1, True),
    Probe("compress: LFC sums", "block rows in runs of 4", "bfloat16", "probe_block_statsIN3c108BFloat16ELi4E", r"^F2F\.F64", 1, True),
    Probe("compress: LFC sums", "block rows in runs of 2 (W, B even: 14x14)", "float32", "probe_block_statsIfLi2E", r"^F2F\.F64", 1, True),
    Probe("compress: LFC sums", "block rows in runs of 2 (W, B even: 14x14)", "bfloat16", "probe_block_statsIN3c108BFloat16ELi2E", r"^F2F\.F64", 1, True),
    Probe("compress: LFC sums", "a block of whole rows, flat (7x7)", "float32", "probe_block_statsIfLi0E", r"^F2F\.F64", 1, True),
    Probe("compress: LFC sums", "a block of whole rows, flat (7x7)", "bfloat16", "probe_block_statsIN3c108BFloat16ELi0E", r"^F2F\.F64", 1, True),
    Probe("compress: LFC sums", "element walk (other W, B)", "float32", "probe_block_statsIfLi1E", r"^F2F\.F64", 1, True),
    Probe("decompress NCHW", "runs of 4", "float32", "probe_vec_decompressIfLi4ELb1E", r"^FMUL", 2, False),
    Probe("decompress NCHW", "runs of 4", "bfloat16", "probe_vec_decompressIN3c108BFloat16ELi8ELb1E", r"^FMUL", 2, False),
    Probe("decompress NCHW", "element walk (other W, B; every reload taken)", "float32", "probe_vec_decompressIfLi4ELb0E", r"^FMUL", 2, False),
    Probe("decompress NCHW", "element walk (other W, B; every reload taken)", "bfloat16", "probe_vec_decompressIN3c108BFloat16ELi8ELb0E", r"^FMUL", 2, False),
    Probe("decompress NCHW", "a thread per code word (16 elements), decode and direct stores (word_direct)", "float32", "probe_word_decompressIfLi2E", r"^FMUL", 2, False),
    Probe("decompress NCHW", "a thread per code word (16 elements), decode and direct stores (word_direct)", "bfloat16", "probe_word_decompressIN3c108BFloat16ELi2E", r"^FMUL", 2, False),
    Probe("decompress NCHW", "plane: a thread per one-block plane (7x7), per word of its loop", "float32", "probe_plane_decompressIfLi2E", r"^FMUL", 2, True),
    Probe("decompress NCHW", "plane: a thread per one-block plane (7x7), per word of its loop", "bfloat16", "probe_plane_decompressIN3c108BFloat16ELi2E", r"^FMUL", 2, True),
    Probe("decompress NCHW", "plane_words: planes staged whole (14x14), a thread per code word", "float32", "probe_plane_words_decompressIfLi2E", r"^FMUL", 2, False),
    Probe("decompress NCHW", "plane_words: planes staged whole (14x14), a thread per code word", "bfloat16", "probe_plane_words_decompressIN3c108BFloat16ELi2E", r"^FMUL", 2, False),
    Probe("decompress channels_last", "16 bytes of channels x 16 pixels", "float32", "probe_channel_decompressIfLi4ELi2E", r"^FMUL", 2, False, 2, 8),
    Probe("decompress channels_last", "16 bytes of channels x 16 pixels", "bfloat16", "probe_channel_decompressIN3c108BFloat16ELi8ELi2E", r"^FMUL", 2, False, 2, 16),
]

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)")


def find_tool(name: str) -> str:
    """A CUDA binary from CUDA_HOME, PATH, or (cuobjdump) the copy triton ships."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [Path(home) / "bin" / name, shutil.which(name)]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    raise SystemExit(f"kernel_sass: {name} not found (set CUDA_HOME, or put it on PATH)")


def compile_probe(cubin: Path) -> str:
    """Compiles the probes for sm_90; returns nvcc's version line."""
    from torch.utils.cpp_extension import include_paths

    nvcc = find_tool("nvcc")
    includes = [f"-I{p}" for p in [ROOT / "cuda_ext", *include_paths()]]
    cmd = [nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-cubin", *includes, "-o", str(cubin), str(PROBE)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    version = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    return version.strip().splitlines()[-1]


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Kernel name -> [(address, instruction)] of a cuobjdump -sass listing."""
    out = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        out[name] = [(int(a, 16), t.strip()) for a, t in INSTRUCTION.findall(chunk)]
    return out


def opcode(instruction: str) -> str:
    return instruction.split()[1] if instruction.startswith("@") else instruction.split()[0]


def loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(head index, back-branch index) of every backward branch."""
    index = {a: i for i, (a, _) in enumerate(code)}
    found = []
    for i, (a, t) in enumerate(code):
        m = BRANCH.match(t)
        if m and int(m.group(2), 16) <= a:
            found.append((index[int(m.group(2), 16)], i))
    return found


def hot_path(code: list[tuple[int, str]], head: int, back: int) -> list[int]:
    """The indices of the instructions from `head` to `back` along the fall-through of
    conditional branches."""
    index = {a: i for i, (a, _) in enumerate(code)}
    path, i = [], head
    while head <= i <= back and len(path) < 20000:
        t = code[i][1]
        path.append(i)
        m = BRANCH.match(t)
        if m and not m.group(1) and i != back:  # unconditional: follow it
            i = index[int(m.group(2), 16)]
            continue
        i += 1
    return path


def thread_path(code: list[tuple[int, str]], loops_: list[tuple[int, int]], probe: Probe) -> list[str]:
    """One thread of a three-level probe: the outer hot path (setup, one segment, one pass of the
    innermost loop), with the segment part repeated `segments` times and the innermost pass
    `iterations` times."""
    nested = sorted(loops_, key=lambda hb: hb[1] - hb[0], reverse=True)[:3]
    if len(nested) < 3:
        raise SystemExit(f"kernel_sass: {probe.symbol} has no three nested loops")
    (h0, b0), (h1, b1), (h2, b2) = nested
    path = hot_path(code, h0, b0)
    inner = [code[i][1] for i in path if h2 <= i <= b2]
    segment = [code[i][1] for i in path if h1 <= i <= b1 and not h2 <= i <= b2]
    setup = [code[i][1] for i in path if not h1 <= i <= b1]
    return setup + segment * probe.segments + inner * probe.iterations


def measure(code: list[tuple[int, str]], probe: Probe) -> dict:
    marker = re.compile(probe.marker)
    candidates = [(h, b) for h, b in loops(code) if any(marker.search(opcode(t)) for _, t in code[h : b + 1])]
    if not candidates:
        raise SystemExit(f"kernel_sass: no loop with {probe.marker} in {probe.symbol}")
    if probe.innermost:  # the unrolled main loop, not its remainder: most markers among innermost
        inner = [(h, b) for h, b in candidates
                 if not any(h <= h2 and b2 <= b and (h2, b2) != (h, b) for h2, b2 in candidates)]
        head, back = max(inner, key=lambda hb: sum(1 for _, t in code[hb[0] : hb[1] + 1] if marker.search(opcode(t))))
    else:
        head, back = max(candidates, key=lambda hb: hb[1] - hb[0])
    if probe.segments:
        path = thread_path(code, candidates, probe)
    else:
        path = [code[i][1] for i in hot_path(code, head, back)]
    elements = sum(1 for t in path if marker.search(opcode(t))) / probe.per_element
    ops = Counter(opcode(t).split(".")[0] for t in path)
    return {
        "phase": probe.phase, "path": probe.path, "dtype": probe.dtype, "instructions": len(path),
        "elements": elements, "per_element": round(len(path) / elements, 1) if elements else None,
        "top_ops": dict(ops.most_common(8)),
    }


def write_outputs(out: Path, rows: list[dict], info: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**info, "rows": rows}, indent=1))
    lines = [
        f"Instructions per element on the hot path of each codec phase, sm_90 SASS ({info['nvcc']}), "
        f"git {info['git']}", "", f"`{info['command']}`", "",
        "| phase | path | dtype | instructions | elements | per element | most frequent |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in list(r["top_ops"].items())[:5])
        lines.append(f"| {r['phase']} | {r['path']} | {r['dtype']} | {r['instructions']} | "
                     f"{r['elements']:g} | {r['per_element']} | {top} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    with figure(out.with_suffix(".png"), figsize=(9, 0.45 * len(rows) + 1.2)) as (_, ax):
        labels = [f"{r['phase']}, {r['path']}, {r['dtype']}" for r in rows]
        ax.barh(range(len(rows)), [r["per_element"] for r in rows], color="tab:blue")
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("instructions per element (sm_90 SASS, hot path)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output stem: <out>.json, .md, .png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "probe.cubin"
        nvcc = compile_probe(cubin)
        sass = subprocess.run([find_tool("cuobjdump"), "-sass", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
    kernels = functions(sass)
    rows = []
    for probe in PROBES:
        name = next((n for n in kernels if probe.symbol in n), None)
        if name is None:
            raise SystemExit(f"kernel_sass: probe {probe.symbol} missing from the cubin")
        rows.append(measure(kernels[name], probe))
    info = {**run_info(torch.device("cpu")), "device": "none (static: sm_90 machine code)", "nvcc": nvcc}
    write_outputs(args.out, rows, info)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
