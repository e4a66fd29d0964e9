"""Where a model's gradient error comes from, group by group: what to give more bits (layer_bits).

    python benchmarks/layer_sensitivity.py --model maxvit_t --groups stem 'blocks.*MBconv' \\
        'blocks.*window_attention' 'blocks.*grid_attention' --out logs/bench/sensitivity_maxvit_t
    python benchmarks/layer_sensitivity.py --model resnet50 --depth 1 --out /tmp/sens   # layer1..layer4, stem layers
    python benchmarks/layer_sensitivity.py --model resnet18 --depth 1 --tiny --out /tmp/sens   # smoke test

A group is a module name pattern (DivisionConfig's matching: the modules it names and all inside
them), or with --depth every module at that depth of the names (and the leaves above it). For each
group the model is converted with that group alone compressed (every other module excluded), and
the benchmark reports the activation memory the group's compression saves on a training forward
(batch 2, division.summary) and the gradient error it alone causes, 1 - cosine between the
whole-model gradient and the exact one on Fashion-MNIST images (mean of --draws draws), at
--hfc-bits and, with --more-bits, at those Qs too, given as layer_bits gives them (the group's
HFC and activation records at that Q; at --hfc-bits, activation layers at activation_bits). Error per MiB saved ranks the groups: give more
bits (or exclude) where it is highest. The suggested plan does that for at most --budget more
activation memory than the whole model at --hfc-bits: the upgrades (a larger Q measured, or stock)
that remove the most error per MiB, one at a time. Its figures are the whole model's with the
rows' differences, a prediction: memory adds up across groups (what two groups share aside: a
ReLU converted alone adds its mask to what the next convolution keeps, so keep such layers in one
group), errors less so (the rows' errors sum to more than the whole model's, and a group's upgrade
removes less than its row says), so the plan is then converted and measured as the rows were, and
both figures are given.
Writes <out>.json, .md, .png.
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
from torch import nn
from tqdm import tqdm

import division
from benchmarks.common import figure, run_info
from benchmarks.model_zoo import FIXED_SIZE, build_model, flat_grad, load_images
from division.plan import layer_plan

WHOLE_MODEL = "whole model"  # the last row: every group compressed


def depth_groups(model: nn.Module, depth: int) -> list[str]:
    """The module names `depth` levels down (and leaves above that level): every layer in one."""
    return [name for name, m in model.named_modules() if name and (
        name.count(".") + 1 == depth or (name.count(".") + 1 < depth and next(m.children(), None) is None))]


def outside(model: nn.Module, group: str) -> list[str]:
    """The fewest module names whose subtrees hold every module outside `group` and nothing in it
    (DivisionConfig.exclude for "this group alone"). The group's modules are those DivisionConfig's
    own matching picks for the pattern (division.plan: the modules it names and all inside them)."""
    try:
        inside = set(layer_plan(model, division.DivisionConfig(exclude=(group,))).excluded)
    except ValueError:  # the pattern names no module
        raise ValueError(f"--groups: {group!r} names no module of {type(model).__name__}") from None
    names = [name for name, _ in model.named_modules() if name]
    holds = {n for n in names if any(m == n or m.startswith(n + ".") for m in inside)}  # n or its subtree in group
    return [n for n in names if n not in holds and n.rpartition(".")[0] in holds | {""}]


def row_config(group: str, exclude: list[str], q: int, base_q: int) -> division.DivisionConfig:
    """A row's conversion at Q = `q`: the group given `q` as a plan gives it (layer_bits, which sets
    both hfc_bits and activation_bits), so a suggested upgrade means what its row measured; at the
    base Q, the defaults (activation layers at activation_bits)."""
    pattern = "*" if group == WHOLE_MODEL else group
    return division.DivisionConfig(hfc_bits=base_q, exclude=tuple(exclude),
                                   layer_bits=() if q == base_q else ((pattern, q),))


def measure(stock: nn.Module, cfg: division.DivisionConfig, data: dict[str, Any], draws: int) -> dict[str, float]:
    """The activation memory the model converted under `cfg` saves, and its gradient error."""
    model = division.convert_model(copy.deepcopy(stock), cfg)
    report = division.summary(model, data["memory_x"])
    cosines = [F.cosine_similarity(flat_grad(model, data["x"], data["y"], s), data["exact"], dim=0).item()
               for s in range(draws)]
    return {"saved_mib": (report.total_vanilla_bytes - report.total_saved_bytes) / 2**20,
            "error": 1 - statistics.mean(cosines), "error_min": 1 - max(cosines), "error_max": 1 - min(cosines)}


def markdown(rows: list[dict[str, Any]], bits: list[int], stock_mib: float) -> str:
    head = "| group | " + " | ".join(f"Q={q}: MiB saved | 1 - cosine | error per MiB" for q in bits) + " |"
    out = [head, "|---|" + "---|---|---|" * len(bits)]
    for r in rows:
        cells = [r["group"]]
        for q in bits:
            e = r[f"q{q}"]
            per_mib = e["error"] / e["saved_mib"] if e["saved_mib"] > 0 else float("nan")
            cells += [f"{e['saved_mib']:.1f}", f"{e['error']:.3f} ({e['error_min']:.3f}-{e['error_max']:.3f})",
                      f"{per_mib:.4f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + f"\n\nStock model: {stock_mib:.1f} MiB of activations saved for backward."


NOISE = 1e-6  # an error below this is the float rounding of an exact gradient's cosine


def suggest(rows: list[dict[str, Any]], bits: list[int], stock_mib: float, budget: float) -> dict[str, Any]:
    """The plan that removes the most error for at most `budget` (a fraction) more memory than the
    whole model at bits[0]: greedy upgrades, each to a larger measured Q or to stock, the most error
    removed per MiB first. Costs and gains are the groups' rows' differences, added to the whole
    model's measured memory and error (the rows' own sums count twice what two groups share)."""
    options = {r["group"]: [(q, r[f"q{q}"]["saved_mib"], r[f"q{q}"]["error"]) for q in bits] + [(None, 0.0, 0.0)]
               for r in rows if r["group"] != WHOLE_MODEL}
    whole = next(r for r in rows if r["group"] == WHOLE_MODEL)[f"q{bits[0]}"]
    base_memory = stock_mib - whole["saved_mib"]
    choice = dict.fromkeys(options, 0)
    allowed, spent, removed = budget * base_memory, 0.0, 0.0
    while (best := best_upgrade(options, choice, allowed - spent)) is not None:
        group, j, cost, gain = best
        choice[group], spent, removed = j, spent + cost, removed + gain
    chosen = {g: options[g][i][0] for g, i in choice.items() if i > 0}
    return {
        "budget": budget, "layer_bits": {g: q for g, q in chosen.items() if q is not None},
        "exclude": [g for g, q in chosen.items() if q is None],
        "memory_mib": base_memory + spent, "base_memory_mib": base_memory,
        "error": max(0.0, whole["error"] - removed), "base_error": whole["error"],
    }


Option = tuple[int | None, float, float]  # (Q or None for stock, MiB saved, error)


def best_upgrade(options: dict[str, list[Option]], choice: dict[str, int],
                 left: float) -> tuple[str, int, float, float] | None:
    """(group, option, MiB it costs, error it removes) of the upgrade removing the most error per
    MiB within `left` MiB, or None."""
    best, best_ratio = None, 0.0
    for group, opts in options.items():
        now = opts[choice[group]]
        for j in range(choice[group] + 1, len(opts)):
            cost, gain = now[1] - opts[j][1], now[2] - opts[j][2]
            if gain <= NOISE or cost > left:
                continue
            ratio = gain / cost if cost > 0 else float("inf")
            if best is None or ratio > best_ratio:
                best, best_ratio = (group, j, cost, gain), ratio
    return best


def suggestion_text(plan: dict[str, Any], bits: list[int]) -> str:
    flags = "".join([" --layer-bits " + " ".join(f"'{g}={q}'" for g, q in plan["layer_bits"].items())] * bool(plan["layer_bits"])
                    + [" --exclude " + " ".join(f"'{g}'" for g in plan["exclude"])] * bool(plan["exclude"]))
    if not flags:
        return f"Suggested plan for at most {plan['budget']:.0%} more memory: the whole model at Q={bits[0]} (no upgrade fits)."
    measured = plan["measured"]
    return (f"Suggested plan for at most {plan['budget']:.0%} more memory than the whole model at Q={bits[0]} "
            f"({plan['base_memory_mib']:.1f} MiB, 1 - cosine {plan['base_error']:.3f}):{flags}. Predicted "
            f"{plan['memory_mib']:.1f} MiB and {plan['error']:.3f}; measured (the plan converted and measured as "
            f"the rows were) {measured['memory_mib']:.1f} MiB and {measured['error']:.3f}. In a model: "
            f"`DivisionConfig(layer_bits={plan['layer_bits']}, exclude={plan['exclude']})`.")


def plot(rows: list[dict[str, Any]], bits: list[int], path: Path) -> None:
    groups = [r for r in rows if r["group"] != WHOLE_MODEL]
    with figure(path, 1, 2, figsize=(11, 3.8)) as (_, axes):
        width = 0.8 / len(bits)
        for i, q in enumerate(bits):
            offsets = [k + (i - (len(bits) - 1) / 2) * width for k in range(len(groups))]
            axes[0].bar(offsets, [r[f"q{q}"]["saved_mib"] for r in groups], width, label=f"Q={q}")
            axes[1].bar(offsets, [r[f"q{q}"]["error"] for r in groups], width, label=f"Q={q}")
        axes[0].set_ylabel("activation MiB its compression saves")
        axes[1].set_ylabel("gradient error it alone causes (1 - cosine)")
        for ax in axes:
            ax.set_xticks(range(len(groups)), [r["group"] for r in groups], rotation=30, ha="right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a torchvision classifier")
    parser.add_argument("--groups", nargs="*", default=[], metavar="PATTERN", help="module name patterns")
    parser.add_argument("--depth", type=int, default=1, help="without --groups: the modules at this depth")
    parser.add_argument("--hfc-bits", type=int, default=division.DivisionConfig().hfc_bits)
    parser.add_argument("--more-bits", type=int, nargs="*", default=[], help="also measure each group at these Qs")
    parser.add_argument("--budget", type=float, default=0.05,
                        help="suggest a plan for at most this fraction more memory (0.05: 5%%)")
    parser.add_argument("--size", type=int, default=64, help="image side of the gradient batch")
    parser.add_argument("--batch", type=int, default=16, help="images in the gradient batch")
    parser.add_argument("--memory-size", type=int, default=224, help="image side of the memory batch (2 images)")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="smoke test: synthetic images, 32 px, 2 draws")
    parser.add_argument("--out", type=Path, required=True, help="output path without extension")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.batch, args.memory_size, args.draws = 32, 4, 32, 2
    if args.model in FIXED_SIZE:
        args.size = args.memory_size = FIXED_SIZE[args.model]
    torch.manual_seed(0)
    stock = build_model(args.model, "torchvision")
    x, y = load_images(args.batch, args.size, args.tiny)
    memory_x = torch.randn(2, 3, args.memory_size, args.memory_size, generator=torch.Generator().manual_seed(1))
    data = {"x": x, "y": y, "memory_x": memory_x, "exact": flat_grad(stock, x, y, 0)}
    groups = args.groups or depth_groups(stock, args.depth)
    bits = [args.hfc_bits] + sorted(set(args.more_bits) - {args.hfc_bits})
    try:
        plans = [(g, outside(stock, g)) for g in groups] + [(WHOLE_MODEL, [])]
    except ValueError as err:
        parser.error(str(err))
    rows = []
    for group, exclude in tqdm(plans, desc="groups"):
        rows.append({"group": group, "exclude": exclude,
                     **{f"q{q}": measure(stock, row_config(group, exclude, q, bits[0]), data, args.draws) for q in bits}})
    stock_mib = division.summary(stock, memory_x).total_vanilla_bytes / 2**20
    plan = suggest(rows, bits, stock_mib, args.budget)
    if plan["layer_bits"] or plan["exclude"]:  # the prediction checked: the plan measured as the rows were
        cfg = division.DivisionConfig(hfc_bits=bits[0], layer_bits=plan["layer_bits"], exclude=plan["exclude"])
        measured = measure(stock, cfg, data, args.draws)
        plan["measured"] = {"memory_mib": stock_mib - measured["saved_mib"], "error": measured["error"]}
    table = markdown(rows, bits, stock_mib) + "\n\n" + suggestion_text(plan, bits)
    print(table)
    info = {**run_info(torch.device("cpu")), "model": args.model, "size": args.size, "batch": args.batch,
            "memory_size": args.memory_size, "draws": args.draws, "bits": bits, "stock_mib": stock_mib}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**info, "rows": rows, "suggested": plan}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"Gradient error by group, {args.model}, {info['device']}, torch {info['torch']}, git {info['git']}\n\n"
        f"`{info['command']}`\n\nEach row: that group alone compressed (everything else stock); \"whole model\": all of it; "
        f"at Q={bits[0]} as DivisionConfig(hfc_bits={bits[0]}) compresses it, at a larger Q as layer_bits does (HFC and "
        f"activation records at that Q). MiB saved: "
        f"activation memory of one training forward, batch 2, {args.memory_size}x{args.memory_size}, less than "
        f"stock's; 1 - cosine: the whole-model gradient against the exact one, {args.batch} Fashion-MNIST images "
        f"at {args.size}x{args.size}, mean (range) of {args.draws} draws, random weights, dropout and stochastic "
        f"depth off. The suggested plan is predicted from the rows (see the script's docstring), then measured."
        f"\n\n{table}\n"
    )
    plot(rows, bits, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
