"""Collect the metrics.jsonl of finished runs into the paper-style accuracy table.

    python scripts/summarize.py logs/runs logs/multirun [--markdown table.md] [--json table.json]

Every folder holding a metrics.jsonl below the given paths is one row: experiment, model, data set,
method and its settings, epochs run, final and best top-1, final top-5, img/s, activation memory.
Runs with the same settings but different seeds are listed separately; see
scripts/accuracy_benchmark.sh for means over seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

COLUMNS = ("run", "model", "data", "method", "B", "Q", "epochs", "top1", "best_top1", "top5", "img_per_s", "act_mem_gib")


def read_run(metrics_file: Path) -> dict[str, Any] | None:
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    settings = last.get("method_settings") or {}
    config_file = metrics_file.parent / "config.yaml"
    name = metrics_file.parent.name
    if config_file.is_file():
        cfg = yaml.safe_load(config_file.read_text())
        name = f"{cfg.get('experiment_name', '')}/{metrics_file.parent.name}"
    return {
        "run": name,
        "model": last.get("model"),
        "data": last.get("data"),
        "method": last.get("method"),
        "B": settings.get("block_size"),
        "Q": settings.get("hfc_bits", settings.get("bits")),
        "epochs": last.get("epoch"),
        "top1": last.get("val_acc1"),
        "best_top1": max(line.get("val_acc1", float("-inf")) for line in lines),
        "top5": last.get("val_acc5"),
        "img_per_s": last.get("img_per_s"),
        "act_mem_gib": next((line["act_mem_gib"] for line in lines if line.get("act_mem_gib") is not None), None),
        "path": str(metrics_file.parent),
    }


def collect(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        files = [path] if path.is_file() else sorted(path.rglob("metrics.jsonl"))
        for f in files:
            row = read_run(f)
            if row is not None:
                rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or folders above them")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such path: {', '.join(missing)}")
    rows = collect(args.paths)
    if not rows:
        parser.error(f"no metrics.jsonl found under {', '.join(map(str, args.paths))}")
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
