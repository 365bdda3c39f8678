"""Images of no known class: shifted CIFAR-10 buckets mixed with 0%, 20% and 40% images of no CIFAR-10 class.

Each bucket is a folder `<out>/<shift>-<pct>/known/<class>/<i>.png` + `unknown/<kind>/<i>.png`; the same shift
is applied to the unknown images (they come from the same camera as the rest of the bucket). Unknown kinds:
`noise` (Gaussian noise around a random colour), `flat` (flat colours with a faint gradient), `digits` (digits
drawn in random colours, sizes and places) and `textures` (crops of the DTD photographs in
../shared/datasets/dtd10). HELD_OUT (`textures`) was kept out of every choice (score, threshold rule,
weighting): the choices were made on the pooled AUROC of the other kinds only, and it is reported apart.

Adaptation reads the whole folder without labels; only scoring reads them. Variants: `zero_shot`,
`balanced` (the training-free peer: zero-shot with Sinkhorn class offsets over the whole bucket), `must`
(the paper's MUST: benchmarks.quality's CALIBRATED + --set, `unknown_weighting=off`), `must_robust` (the
same with `unknown_weighting=ueo`), `must_ueo_zero_shot` (`unknown_weighting=ueo_zero_shot`), and the
product's default, `auto` (`must adapt` with no settings; CALIBRATED and --set do not apply) and
`auto_ueo_zero_shot` (the same with `unknown_weighting=ueo_zero_shot`). Per
variant and mix: known-class top-1 (on the known images of the bucket), AUROC and FPR at 95% TPR of
known vs unknown for every candidate score (positives = known images; FPR95 = share of unknown images
taken for known at the threshold that keeps 95% of the known ones), the same per unknown kind, and what
the fitted label-free threshold flags.

    python -m benchmarks.unknowns --out runs/unknowns --jsonl runs/unknowns.jsonl
    python -m benchmarks.unknowns --summary runs/unknowns.jsonl --detail
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from benchmarks.proxy_clip import SHARED_DATASETS
from benchmarks.quality import CALIBRATED
from benchmarks.shifts import apply_shift, shifted_test_set
from must_engine import Predictor, adapt, resolve_job_config
from must_engine.balance import balance_classes
from must_engine.cli import parse_override
from must_engine.images import find_images, open_image
from must_engine.unknown import OOD_SCORE, SCORES, fit_threshold, is_unknown, ood_score

KINDS = ("noise", "flat", "digits", "textures")
HELD_OUT = "textures"
MIXES = (0.0, 0.2, 0.4)
VARIANTS = ("zero_shot", "balanced", "must", "must_robust", "must_ueo_zero_shot", "auto", "auto_ueo_zero_shot")
WEIGHTING = {"must": "off", "must_robust": "ueo", "must_ueo_zero_shot": "ueo_zero_shot", "auto": "off",
             "auto_ueo_zero_shot": "ueo_zero_shot"}
CALIBRATED_VARIANTS = ("must", "must_robust", "must_ueo_zero_shot")  # the others: no CALIBRATED, no --set
DTD_DIR = SHARED_DATASETS / "dtd10"


def unknown_images(kind: str, n: int, seed: int, size: int = 32) -> np.ndarray:
    """uint8 (n, size, size, 3) images of one kind that belong to no CIFAR-10 class."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    if kind == "noise":
        base = rng.uniform(0, 255, (n, 1, 1, 3))
        return np.clip(base + rng.normal(0, rng.uniform(20, 80, (n, 1, 1, 1)), (n, size, size, 3)), 0, 255).astype(
            np.uint8)
    if kind == "flat":
        colour = rng.uniform(0, 255, (n, 1, 1, 3))
        ramp = np.linspace(-1, 1, size)[None, None, :, None] * rng.uniform(-20, 20, (n, 1, 1, 3))  # across columns
        return np.clip(np.broadcast_to(colour + ramp, (n, size, size, 3)), 0, 255).astype(np.uint8)
    if kind == "digits":
        return np.stack([_digit(rng, size) for _ in range(n)])
    if kind == "textures":
        paths = sorted(find_images(DTD_DIR))
        picks = rng.choice(len(paths), n, replace=n > len(paths))
        return np.stack([_crop(open_image(paths[i]), rng, size) for i in picks])
    raise ValueError(f"unknown kind {kind!r}")


def _digit(rng: np.random.Generator, size: int) -> np.ndarray:
    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    ink = tuple(int(255 - c) for c in background)
    canvas = Image.new("RGB", (size * 4, size * 4), background)
    font = ImageFont.load_default(size=int(rng.integers(size * 2, size * 4)))
    ImageDraw.Draw(canvas).text((int(rng.integers(0, size)), int(rng.integers(-size // 2, size // 2))),
                                str(int(rng.integers(0, 10))), fill=ink, font=font)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))


def _crop(image: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
    side = int(min(image.size) * rng.uniform(0.3, 1.0))
    left, top = int(rng.integers(0, image.width - side + 1)), int(rng.integers(0, image.height - side + 1))
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BOX))


def write_bucket(out: Path, shift: str, share: float, known: int, seed: int) -> Path:
    """A bucket of `known` shifted CIFAR-10 test images plus unknown images making `share` of the whole."""
    folder = out / f"{shift}-{round(100 * share):02d}-seed{seed}"  # the seed draws the images: one folder each
    if (folder / "done").exists():
        return folder
    data, index = shifted_test_set(shift, seed=seed, limit=known)
    for image, label, i in zip(data.images, data.labels, index, strict=True):
        (folder / "known" / data.classes[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / "known" / data.classes[label] / f"{i:05d}.png")
    total = round(known * share / (1 - share))
    for k, kind in enumerate(KINDS):
        count = total // len(KINDS) + (k < total % len(KINDS))
        if not count:
            continue
        images = apply_shift(unknown_images(kind, count, seed), shift, seed=seed + 1)
        (folder / "unknown" / kind).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / "unknown" / kind / f"{i:05d}.png")
    (folder / "done").write_text("")
    return folder


def bucket_samples(folder: Path, class_names: list[str]) -> tuple[list[Path], torch.Tensor, list[str]]:
    """Every image, its class index (-1 for unknown images) and its kind ("known" or the unknown kind)."""
    paths, labels, kinds = [], [], []
    for path in sorted(find_images(folder)):
        group, name = path.relative_to(folder).parts[:2]
        paths.append(path)
        labels.append(class_names.index(name) if group == "known" else -1)
        kinds.append("known" if group == "known" else name)
    return paths, torch.tensor(labels), kinds


def auroc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """P(score of a random unknown image > score of a random known one), ties half (Mann-Whitney U)."""
    scores = torch.cat([known, unknown]).double()
    ranks = _average_ranks(scores)
    u = ranks[len(known):].sum() - len(unknown) * (len(unknown) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    for value in x.unique():  # ties share their mean rank
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def fpr_at_95_tpr(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """Share of unknown images scored at or below the threshold that keeps 95% of the known images."""
    threshold = torch.quantile(known.double(), 0.95)
    return float((unknown.double() <= threshold).double().mean())


def score_bucket(logits: torch.Tensor, bias: torch.Tensor, scale: float, labels: torch.Tensor, kinds: list[str],
                 threshold: float | None) -> dict[str, Any]:
    """Known-class top-1 and every detection figure of one model on one bucket."""
    known = labels >= 0
    row: dict[str, Any] = {"top1_known": float((logits[known].argmax(dim=-1) == labels[known]).float().mean()),
                           "n_known": int(known.sum()), "n_unknown": int((~known).sum())}
    kinds_present = sorted({k for k in kinds if k != "known"})
    tuning = torch.tensor([k not in ("known", HELD_OUT) for k in kinds])
    held = torch.tensor([k == HELD_OUT for k in kinds])
    for name in SCORES:
        scores = ood_score(logits, bias, scale, name)
        if not kinds_present:
            continue
        groups = {"all": ~known, "tuning": tuning, "held_out": held,
                  **{kind: torch.tensor([k == kind for k in kinds]) for kind in kinds_present}}
        for group, mask in groups.items():
            if int(mask.sum()):
                row[f"auroc_{name}_{group}"] = auroc(scores[known], scores[mask])
                row[f"fpr95_{name}_{group}"] = fpr_at_95_tpr(scores[known], scores[mask])
    scores = ood_score(logits, bias, scale)
    fitted = fit_threshold(scores) if threshold is None else {"threshold": threshold}
    flagged = is_unknown(scores, float(fitted["threshold"]))
    row["threshold"] = float(fitted["threshold"])
    row["flagged_share"] = float(flagged.float().mean())
    row["flagged_known"] = float(flagged[known].float().mean())
    if kinds_present:
        row["flagged_unknown"] = float(flagged[~known].float().mean())
    return row


def model_logits(predictor: Predictor, paths: list[Path]) -> torch.Tensor:
    chunks = [predictor.logits(predictor.preprocess([open_image(p, draft_size=2 * predictor.size)
                                                    for p in paths[i : i + 256]]))
              for i in range(0, len(paths), 256)]
    return torch.cat(chunks)


def run_variant(variant: str, folder: Path, class_names: list[str], *, base_model: str,
                overrides: dict[str, Any], device: str, seed: int, keep: Path | None = None) -> dict[str, Any]:
    paths, labels, kinds = bucket_samples(folder, class_names)
    if variant in ("zero_shot", "balanced"):
        predictor = Predictor.zero_shot(base_model, class_names, device=device)
        if variant == "balanced":  # the training-free peer: Sinkhorn offsets over the whole bucket
            balance_classes(predictor.classifier, model_logits(predictor, paths))
        threshold = None  # fitted on the bucket's scores, as adaptation does
    else:
        fields = {**overrides, "seed": seed} if variant in CALIBRATED_VARIANTS else {"seed": seed}
        config = resolve_job_config("auto", {**fields, "unknown_weighting": WEIGHTING[variant]},
                                    num_images=len(paths), num_classes=len(class_names), base_model=base_model)
        with tempfile.TemporaryDirectory() as scratch:
            out = keep / f"{folder.name}-{variant}-{seed}" if keep is not None else Path(scratch)
            adapt(folder, class_names, out, base_model=base_model, config=config, device=device)
            predictor = Predictor.load(out, device=device)
        threshold = float(predictor.metadata["unknown"]["threshold"])
    logits = model_logits(predictor, paths)
    return score_bucket(logits, predictor.classifier.class_bias.cpu(), float(predictor.classifier.logit_scale),
                        labels, kinds, threshold)


def print_summary(rows: list[dict[str, Any]], score: str) -> None:
    """One line per mix, variant and seed: known top-1 (and gain over zero-shot), AUROC and FPR95 of `score`."""
    print(f"score: {score}; AUROC / FPR95 in %, positives = known images; held-out kind: {HELD_OUT}")
    print("| mix | variant | seed | known top-1 | gain vs zero-shot | AUROC (tuning kinds) | AUROC (held-out) | "
          "AUROC (all) | FPR95 (all) | flagged: known / unknown |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    zero = {(r["shift"], r["share"], r["seed"]): r["top1_known"] for r in rows if r["variant"] == "zero_shot"}
    for row in sorted(rows, key=_order):
        base = zero.get((row["shift"], row["share"], row["seed"]))
        gain = f"{100 * (row['top1_known'] - base):+.2f}" if base is not None else "-"

        def cell(key: str, row: dict[str, Any] = row) -> str:
            return f"{100 * row[key]:.2f}" if key in row else "-"

        flagged = f"{cell('flagged_known')} / {cell('flagged_unknown')}"
        print(f"| {row['shift']} {round(100 * row['share'])}% | {row['variant']} | {row['seed']} | "
              f"{cell('top1_known')} | {gain} | {cell(f'auroc_{score}_tuning')} | {cell(f'auroc_{score}_held_out')} | "
              f"{cell(f'auroc_{score}_all')} | {cell(f'fpr95_{score}_all')} | {flagged} |")


def print_over_seeds(rows: list[dict[str, Any]], score: str) -> None:
    """Mean (min-max) over seeds per mix and variant, beside the issue's targets: the gain over zero-shot, what
    the unknown images cost of the variant's clean gain (same seed), and AUROC's margin over zero-shot's."""
    by_key = {(r["shift"], r["share"], r["variant"], r["seed"]): r for r in rows}

    def spread(values: list[float]) -> str:
        return f"{np.mean(values):.2f} ({min(values):.2f} to {max(values):.2f})" if values else "-"

    print(f"score: {score}; mean (min to max) over seeds, points")
    print("| mix | variant | seeds | known top-1 | gain vs zero-shot | cost vs the clean gain | AUROC (all) | "
          "AUROC - zero-shot's | AUROC (held-out) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shift, share, variant in sorted({k[:3] for k in by_key}, key=lambda k: (k[0], k[1], VARIANTS.index(k[2]))):
        seeds = sorted(k[3] for k in by_key if k[:3] == (shift, share, variant))
        top1, gain, cost, auc, auc_margin, held = [], [], [], [], [], []
        for seed in seeds:
            row, zero = by_key[shift, share, variant, seed], by_key.get((shift, share, "zero_shot", seed))
            clean = by_key.get((shift, 0.0, variant, seed))
            top1.append(100 * row["top1_known"])
            if zero is not None:
                gain.append(100 * (row["top1_known"] - zero["top1_known"]))
                if f"auroc_{score}_all" in row:
                    auc_margin.append(100 * (row[f"auroc_{score}_all"] - zero[f"auroc_{score}_all"]))
            if clean is not None and share > 0:
                cost.append(100 * (clean["top1_known"] - row["top1_known"]))
            if f"auroc_{score}_all" in row:
                auc.append(100 * row[f"auroc_{score}_all"])
                held.append(100 * row[f"auroc_{score}_held_out"])
        print(f"| {shift} {round(100 * share)}% | {variant} | {len(seeds)} | {spread(top1)} | {spread(gain)} | "
              f"{spread(cost)} | {spread(auc)} | {spread(auc_margin)} | {spread(held)} |")


def _order(row: dict[str, Any]) -> tuple[str, float, int, int]:
    return row["shift"], row["share"], VARIANTS.index(row["variant"]), row["seed"]


def print_detail(rows: list[dict[str, Any]]) -> None:
    """AUROC of every candidate score per mix and variant, on the tuning kinds, the held-out kind and each kind."""
    kinds = [k for k in KINDS if any(f"auroc_msp_{k}" in r for r in rows)]
    groups = ["tuning", "held_out", *kinds]
    print("| mix | variant | seed | score | " + " | ".join(f"AUROC {g}" for g in groups) + " |")
    print("|---" * (len(groups) + 4) + "|")
    for row in sorted(rows, key=_order):
        if row["n_unknown"] == 0:
            continue
        for score in SCORES:
            cells = [f"{100 * row[f'auroc_{score}_{g}']:.2f}" if f"auroc_{score}_{g}" in row else "-" for g in groups]
            print(f"| {row['shift']} {round(100 * row['share'])}% | {row['variant']} | {row['seed']} | {score} | "
                  + " | ".join(cells)
                  + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the buckets (written once, then reused)")
    parser.add_argument("--jsonl", type=Path, help="append one row per finished run; rows already there are skipped")
    parser.add_argument("--summary", type=Path, help="print the table of this row file and exit")
    parser.add_argument("--score", default=OOD_SCORE, choices=list(SCORES), help="the score the summary shows")
    parser.add_argument("--detail", action="store_true", help="with --summary: AUROC of every score and kind")
    parser.add_argument("--shift", default="defocus_blur")
    parser.add_argument("--known", type=int, default=1000, help="known images per bucket")
    parser.add_argument("--mixes", default=",".join(str(m) for m in MIXES), help="shares of unknown images")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--base-model", default="proxy-cifar10-tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field of the adapted variants on top of CALIBRATED")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep-models", type=Path, help="also keep each adapted model under this folder")
    args = parser.parse_args()
    if args.summary:
        rows = [json.loads(line) for line in args.summary.read_text().splitlines() if line.strip()]
        print_summary(rows, args.score)
        print()
        print_over_seeds(rows, args.score)
        if args.detail:
            print()
            print_detail(rows)
        return
    if args.out is None:
        parser.error("give --out (or --summary)")
    overrides = {**CALIBRATED, **dict(parse_override(item) for item in args.set)}
    done = set()
    if args.jsonl is not None and args.jsonl.is_file():
        done = {(r["shift"], r["share"], r["variant"], r["seed"])
                for r in map(json.loads, args.jsonl.read_text().splitlines()) if r}
    class_names = list(np.load(SHARED_DATASETS / "cifar10" / "test.npz")["classes"])
    for share in (float(m) for m in args.mixes.split(",")):
        folder = write_bucket(args.out, args.shift, share, args.known, args.seed)
        for variant in args.variants.split(","):
            if (args.shift, share, variant, args.seed) in done:
                continue
            started = time.perf_counter()
            row = run_variant(variant, folder, [str(c) for c in class_names], base_model=args.base_model,
                              overrides=overrides, device=args.device, seed=args.seed, keep=args.keep_models)
            row = {"shift": args.shift, "share": share, "variant": variant, "seed": args.seed,
                   "overrides": overrides if variant in CALIBRATED_VARIANTS else {},  # what the variant applied
                   "seconds": time.perf_counter() - started, **row}
            print(json.dumps({k: v for k, v in row.items() if k != "overrides"}), flush=True)
            if args.jsonl is not None:
                args.jsonl.parent.mkdir(parents=True, exist_ok=True)
                with args.jsonl.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
