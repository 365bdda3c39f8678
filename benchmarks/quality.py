"""Quality benchmark: the product's default beside the Table 5 ablation and peer methods, per shifted target.

Each target is a labelled folder `<targets>/<shift>/<class>/<image>`. Adaptation reads the folder without
labels (transductive adaptation, the paper's section 4.8); only scoring reads the labels. Variants:
- `zero_shot`; `auto`: what a team gets, `must adapt` with no settings at all (preset auto, no overrides);
  `auto_balanced`: auto's probabilities balanced over the target (Sinkhorn, as `balanced` below);
- the Table 5 ablation `self_training`, `st_mim`, `must` with the CALIBRATED hyperparameters (picked on the
  dev shift only) plus --preset/--set, the same for every shift, and each one `_balanced` like auto;
- peers (benchmarks/peers.py): `balanced`, `em_prior`, `distribution_normalization`, `label_propagation`
  (training-free), `tent` (norm-layer entropy tuning).

`--class-prior true` gives `auto` (as its `class_prior` field) and every balancing (`balanced`, the `_balanced`
twins) the target's class shares, what a team that knows how its bucket divides would give; `noisy` the same
shares each off by a seeded factor between 1/2 and 2. The default `none` balances to uniform, as `auto` does.

Rows are appended to --jsonl as each run finishes ({target, variant, seed, top1, ...}); a rerun skips the rows
already there, so a table of several hours survives interruptions.

    python -m benchmarks.quality --targets runs/shifts1k --jsonl runs/quality.jsonl --seeds 0,1,2
    python -m benchmarks.quality --summary runs/quality.jsonl      # mean and spread over seeds, per target
    python -m benchmarks.quality --summary runs/*.jsonl --paired auto,balanced   # run by run: A minus B
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.peers import (
    distribution_normalization,
    em_prior,
    image_embeddings,
    label_propagation,
    sinkhorn_balance,
    tent,
)
from must_engine import Predictor, adapt, resolve_job_config
from must_engine.cli import parse_override
from must_engine.estimate import beyond_balancing
from must_engine.evaluate import class_key, labelled_folders
from must_engine.images import open_image

# Picked on the dev shift (gaussian_noise) only, then used unchanged on every other shift (docs/BENCHMARKS.md):
# the paper's lr and strong view are tuned for hours of ViT-B/16 on 224 px photos, not 75 steps of a 32 px proxy.
CALIBRATED: dict[str, Any] = {
    "batch_size": 64, "epochs": 5, "base_lr": 2e-3, "ema_final": 0.995, "tau": 0.7, "w_fair": 3.0,
    "randaugment": "rand-n1-m2-mstd0.5-inc1", "crop_scale_min": 0.8,
    "balance_classes": False,  # the ablation is the paper's method; its `_balanced` twins add the balancing
    "unknown_weighting": "off",  # the paper's method, as in auto (benchmarks/unknowns.py measures UEO)
}
ABLATION: dict[str, dict[str, Any]] = {
    "self_training": {"mim": False},
    "st_mim": {"mim": True, "w_align": 0.0},
    "must": {"mim": True},
}
# Each peer gets the zero-shot predictor, the target's pixels, its zero-shot probabilities and the seed.
PEERS: dict[str, Callable[[Predictor, torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "balanced": lambda predictor, pixels, probs, seed: sinkhorn_balance(probs),
    "em_prior": lambda predictor, pixels, probs, seed: em_prior(probs),
    "distribution_normalization": lambda predictor, pixels, probs, seed: distribution_normalization(
        predictor.classifier, image_embeddings(predictor.classifier, pixels)),
    "tent": lambda predictor, pixels, probs, seed: tent(predictor.classifier, pixels, seed=seed),
    "label_propagation": lambda predictor, pixels, probs, seed: label_propagation(
        image_embeddings(predictor.classifier, pixels), probs),
}
VARIANTS = ["zero_shot", "auto", "auto_balanced", *ABLATION, *(f"{v}_balanced" for v in ABLATION), *PEERS]


def labelled_pixels(predictor: Predictor, target: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the target, preprocessed for this predictor, and its label index (for scoring only)."""
    folders = labelled_folders(target)
    index = {class_key(name): i for i, name in enumerate(predictor.class_names)}
    samples = [(path, index[class_key(name)]) for name, paths in folders.items() for path in paths]
    pixels = torch.cat([
        predictor.preprocess([open_image(path, draft_size=2 * predictor.size) for path, _ in samples[i : i + 256]])
        for i in range(0, len(samples), 256)
    ])
    return pixels, torch.tensor([label for _, label in samples])


def score(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    correct = probs.argmax(dim=-1) == labels
    per_class = [float(correct[labels == k].float().mean()) for k in labels.unique().tolist()]
    return {"top1": float(correct.float().mean()), "mean_per_class": sum(per_class) / len(per_class)}


def team_prior(labels: torch.Tensor, num_classes: int, mode: str, seed: int) -> tuple[float, ...]:
    """The class shares a team would give as `class_prior`: none, the target's own, or those off by up to 2x."""
    if mode == "none":
        return ()
    shares = torch.bincount(labels, minlength=num_classes).double()
    if mode == "noisy":
        generator = torch.Generator().manual_seed(seed)
        shares = shares * 2.0 ** (torch.rand(num_classes, generator=generator, dtype=torch.float64) * 2 - 1)
    return tuple((shares / shares.sum()).tolist())


def run_target(
    target: Path, *, base_model: str, preset: str, overrides: dict[str, Any], variants: list[str], device: str,
    seed: int = 0, auto_overrides: dict[str, Any] | None = None, class_prior: str = "none",
    on_row: Callable[[str, dict[str, float]], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Top-1 and mean-per-class accuracy (and seconds) of each variant on one labelled target."""
    class_names = list(labelled_folders(target))
    zero_shot = Predictor.zero_shot(base_model, class_names, device=device)
    pixels, labels = labelled_pixels(zero_shot, target)
    zero_shot_probs = zero_shot.probabilities(pixels)
    prior = team_prior(labels, len(class_names), class_prior, seed)
    if prior:
        auto_overrides = {**(auto_overrides or {}), "class_prior": list(prior)}
    adapted: dict[str, torch.Tensor] = {}  # each adaptation runs once, also when its balanced twin is asked
    results: dict[str, dict[str, float]] = {}
    for variant in variants:
        started = time.perf_counter()
        base, balanced = variant.removesuffix("_balanced"), variant.endswith("_balanced")
        if variant == "zero_shot":
            probs = zero_shot_probs
        elif variant == "balanced" and prior:
            probs = sinkhorn_balance(zero_shot_probs, prior)
        elif variant in PEERS:
            probs = PEERS[variant](zero_shot, pixels, zero_shot_probs, seed)
        else:
            if base not in adapted:
                preset_of, extra = (("auto", dict(auto_overrides or {})) if base == "auto"
                                    else (preset, {**overrides, **ABLATION[base]}))
                adapted[base] = adapted_probabilities(target, class_names, pixels, base_model=base_model,
                                                      preset=preset_of, overrides={**extra, "seed": seed},
                                                      device=device)
            probs = sinkhorn_balance(adapted[base], prior) if balanced else adapted[base]
        results[variant] = {**score(probs, labels), "seconds": time.perf_counter() - started}
        if variant != "zero_shot":  # what the report's `beyond_balancing` would say of this variant, label-free
            shares = beyond_balancing(probs, zero_shot_probs, prior)
            results[variant].update(class_balancing=shares["class_balancing"],
                                    differs_from_balanced=shares["adapted_differs"])
        print(f"  {target.name:<18} {variant:<14} seed {seed} top-1 {results[variant]['top1']:.4f}  "
              f"({results[variant]['seconds']:.0f} s)", flush=True)
        if on_row is not None:
            on_row(variant, results[variant])
    return results


def adapted_probabilities(
    target: Path, class_names: list[str], pixels: torch.Tensor, *, base_model: str, preset: str,
    overrides: dict[str, Any], device: str,
) -> torch.Tensor:
    config = resolve_job_config(preset, overrides, num_images=len(pixels), num_classes=len(class_names),
                                base_model=base_model)
    with tempfile.TemporaryDirectory() as out:
        adapt(target, class_names, Path(out), base_model=base_model, config=config, device=device)
        return Predictor.load(Path(out), device=device).probabilities(pixels)


def print_table(table: dict[str, dict[str, dict[str, float]]], variants: list[str]) -> None:
    """Top-1 per target and variant (this invocation's runs; a variant missing from a row prints as -)."""
    print("\n| target | " + " | ".join(variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for target, results in table.items():
        cells = [f"{100 * results[v]['top1']:.2f}" if v in results else "-" for v in variants]
        print(f"| {target} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=Path, help="folder of labelled target folders")
    parser.add_argument("--summary", type=Path, nargs="+", metavar="JSONL",
                        help="print the table of these row files (mean and spread over seeds) and exit")
    parser.add_argument("--paired", metavar="A,B",
                        help="with --summary: also A minus B on every target and seed both were run on")
    parser.add_argument("--only", help="comma-separated target names (default: all)")
    parser.add_argument("--base-model", default="proxy-cifar10-tiny")
    parser.add_argument("--preset", default="auto", help="preset of the ablation variants")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field of the ablation variants on top of CALIBRATED")
    parser.add_argument("--auto-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field of `auto` (an experiment on the default; rows record it)")
    parser.add_argument("--class-prior", choices=("none", "true", "noisy"), default="none",
                        help="the class shares `auto` and every balancing get (see above); rows record it")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (adaptations and tent)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jsonl", type=Path, help="append one row per finished run; rows already there are skipped")
    args = parser.parse_args()
    if args.summary:
        rows = [row for path in args.summary for row in _rows(path)]
        print_summary(rows)
        if args.paired:
            first, _, second = args.paired.partition(",")
            print_paired(paired_differences(rows, first, second), first, second)
        return
    if args.targets is None:
        parser.error("give --targets (or --summary)")

    overrides = {**CALIBRATED, **dict(parse_override(item) for item in args.set)}
    auto_overrides = dict(parse_override(item) for item in args.auto_set)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {', '.join(VARIANTS)}")
    targets = sorted(p for p in args.targets.iterdir() if p.is_dir())
    if args.only:
        targets = [p for p in targets if p.name in args.only.split(",")]
    done = _finished_rows(args.jsonl)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for target in targets:
            todo = [v for v in variants if (str(target), v, seed) not in done]
            if not todo:
                continue

            def append(variant: str, row: dict[str, float], target: Path = target, seed: int = seed) -> None:
                if args.jsonl is not None:
                    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
                    with args.jsonl.open("a") as handle:
                        handle.write(json.dumps({"target": target.name, "target_dir": str(target),
                                                 "variant": variant, "seed": seed,
                                                 "base_model": args.base_model,
                                                 "class_prior": args.class_prior,
                                                 "overrides": auto_overrides if variant.startswith("auto")
                                                 else overrides, **row}) + "\n")

            table[f"{target.name} (seed {seed})"] = run_target(
                target, base_model=args.base_model, preset=args.preset, overrides=overrides, variants=todo,
                device=args.device, seed=seed, auto_overrides=auto_overrides, class_prior=args.class_prior,
                on_row=append,
            )
    if table:
        print_table(table, variants)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished_rows(path: Path | None) -> set[tuple[str, str, int]]:
    if path is None or not path.is_file():
        return set()
    return {(_target_of(row), row["variant"], int(row["seed"])) for row in _rows(path)}


def _target_of(row: dict[str, Any]) -> str:
    """The target's folder: two target sets may hold a shift of the same name (runs/longtail/fog and
    runs/shifts1k/fog). Rows written before `target_dir` was recorded fall back to the name."""
    return str(row.get("target_dir", row["target"]))


def print_summary(rows: list[dict[str, Any]]) -> None:
    """Top-1 per target and variant as mean over seeds, with min-max spread and the seed count when > 1."""
    variants = [v for v in VARIANTS if any(row["variant"] == v for row in rows)]
    targets = sorted({_target_of(row) for row in rows})
    cells: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        cells.setdefault((_target_of(row), row["variant"]), []).append(100 * row["top1"])

    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        mean = sum(values) / len(values)
        if len(values) == 1:
            return f"{mean:.2f}"
        return f"{mean:.2f} ({min(values):.1f}-{max(values):.1f}, n={len(values)})"

    print("| target | " + " | ".join(variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for target in targets:
        print(f"| {target} | " + " | ".join(cell(cells.get((target, v), [])) for v in variants) + " |")
    complete = [v for v in variants if all((t, v) in cells for t in targets)]
    means = {v: sum(sum(cells[t, v]) / len(cells[t, v]) for t in targets) / len(targets) for v in complete}
    print("| **mean** | " + " | ".join(f"**{means[v]:.2f}**" if v in means else "-" for v in variants) + " |")


def paired_differences(rows: list[dict[str, Any]], first: str, second: str) -> list[tuple[str, int, float]]:
    """(target, seed, top-1 of `first` minus `second`, in points) wherever both ran on the same target and seed:
    the comparison that seeds and targets do not blur (a training-free peer repeats exactly on every seed)."""
    top1 = {(_target_of(row), row["variant"], int(row["seed"])): 100 * row["top1"] for row in rows}
    return sorted((target, seed, value - top1[target, second, seed])
                  for (target, variant, seed), value in top1.items()
                  if variant == first and (target, second, seed) in top1)


def print_paired(differences: list[tuple[str, int, float]], first: str, second: str) -> None:
    if not differences:
        print(f"\nno target and seed has both {first} and {second}")
        return
    values = [d for _, _, d in differences]
    wins, losses = sum(d > 0 for d in values), sum(d < 0 for d in values)
    print(f"\n{first} minus {second}, points, on {len(values)} target-seed pairs: mean {sum(values) / len(values):+.2f}"
          f" (min {min(values):+.2f}, max {max(values):+.2f}); {wins} above, {losses} below, "
          f"{len(values) - wins - losses} equal")
    for target, seed, value in differences:
        print(f"  {target} seed {seed}: {value:+.2f}")


if __name__ == "__main__":
    main()
