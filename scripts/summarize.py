"""Collect the runs below some folders into the paper-style accuracy table, and all epochs as Parquet.

    python scripts/summarize.py logs/runs logs/multirun [--markdown table.md] [--json rows.json]
                                                         [--parquet epochs.parquet]

Every run folder (one holding metrics.jsonl or status.json) below the given paths is one row: experiment and folder, its
status (status.json: finished, failed, or "running?" for a run still going or killed), model, data
set, method and its settings, epochs done of those configured, final and best top-1, final top-5,
img/s, activation memory. Runs with the same settings but different seeds are listed separately;
see scripts/accuracy_benchmark.sh for means over seeds.

--parquet writes one row per epoch of every run, with the run's status and its whole resolved
config flattened into `cfg.*` columns, for pandas / polars / DuckDB:
    pandas.read_parquet("epochs.parquet").groupby(["cfg.division.hfc_bits"]).val_acc1.max()
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from division.plan import describe_plan
from harness.schema import flatten

COLUMNS = ("run", "status", "model", "data", "method", "B", "Q", "epochs", "top1", "best_top1", "top5",
           "img_per_s", "act_mem_gib")
# a status.json that says "running" belongs to a run still going, or to one that was killed
STATUS_SHOWN = {"finished": "finished", "failed": "failed", "running": "running?"}


def read_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "status.json"
    if not path.is_file():
        return {"status": None}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"status": None}


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_epochs(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's table row, and its epochs with run, status and config columns."""
    epochs = read_epochs(run_dir)
    cfg, status = read_config(run_dir), read_status(run_dir)
    last = epochs[-1] if epochs else {}
    settings = last.get("method_settings") or {}
    name = f"{cfg['experiment_name']}/{run_dir.name}" if "experiment_name" in cfg else run_dir.name
    planned = (cfg.get("trainer") or {}).get("epochs")
    done = sum(1 for e in epochs if e.get("epoch_complete", True))
    top1s = [e["val_acc1"] for e in epochs if e.get("val_acc1") is not None]
    row = {
        "run": name,
        "status": STATUS_SHOWN.get(status.get("status"), "-"),
        "model": last.get("model"),
        "data": last.get("data"),
        "method": last.get("method"),
        "B": settings.get("block_size"),
        "Q": bits_cell(settings),
        "epochs": f"{done}/{planned}" if planned else done,
        "top1": last.get("val_acc1"),
        "best_top1": max(top1s) if top1s else None,
        "top5": last.get("val_acc5"),
        "img_per_s": last.get("img_per_s"),
        "act_mem_gib": next((e["act_mem_gib"] for e in epochs if e.get("act_mem_gib") is not None), None),
        "error": status.get("error"),
        "path": str(run_dir),
    }
    common = {"run": name, "status": row["status"], "path": str(run_dir), **flatten(cfg, "cfg")}
    return row, [{**common, **flatten(e)} for e in epochs]


def bits_cell(settings: dict[str, Any]) -> Any:
    """Q, and where a run set them, its per-layer bits and the layers it left stock."""
    bits = settings.get("hfc_bits", settings.get("bits"))
    plan = describe_plan(settings.get("layer_bits") or [], settings.get("exclude") or [])
    return f"{bits} ({plan})" if plan else bits


def run_dirs(path: Path) -> list[Path]:
    """Folders below `path` (or `path` itself) that a run wrote: a failed run may have no epochs."""
    if path.is_file():
        return [path.parent]
    marks = [*path.rglob("metrics.jsonl"), *path.rglob("status.json")]
    return sorted({m.parent for m in marks})


def collect(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, epochs = [], []
    for run_dir in (d for path in paths for d in run_dirs(path)):
        row, run_epochs = read_run(run_dir)
        rows.append(row)
        epochs += run_epochs
    return rows, epochs


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    failed = [r for r in rows if r["status"] == "failed" and r["error"]]
    if failed:
        out += [""] + [f"- {r['run']} failed: {r['error']}" for r in failed]
    return "\n".join(out)


def write_parquet(epochs: list[dict[str, Any]], path: Path) -> None:
    """One row per epoch; a column whose values differ in kind across runs is stored as text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({k for e in epochs for k in e})
    arrays = {}
    for col in columns:
        values = [e.get(col) for e in epochs]
        try:
            arrays[col] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[col] = pa.array([None if v is None else json.dumps(v) for v in values])
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(arrays), tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or folders above them")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--parquet", type=Path, help="write every epoch of every run here, one row each")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such path: {', '.join(missing)}")
    rows, epochs = collect(args.paths)
    if not rows:
        parser.error(f"no run (metrics.jsonl or status.json) found under {', '.join(map(str, args.paths))}")
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.parquet:
        write_parquet(epochs, args.parquet)
        print(f"{len(epochs)} epochs of {len(rows)} runs -> {args.parquet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
