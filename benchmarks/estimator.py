"""Label-free accuracy estimators against the truth, on the proxy benchmark's 8 shifted targets.

For each target `<targets>/<shift>/<class>/<image>` this runs zero-shot and an adaptation on the folder
without labels (`--adaptation auto`: the product's default, `must adapt` with no settings; `calibrated`:
the paper's MUST under benchmarks.quality's CALIBRATED), labels every image with both (the engine's
`label_batches`, as the worker does for a bucket), and compares each estimator of `must_engine.estimate`
with the true top-1. Labels are read here only, to score the estimates.

    python -m benchmarks.estimator --targets runs/shifts1k --cache runs/estimator-auto --adaptation auto

`--class-prior true` gives the adaptation the target's true class shares as `class_prior` (what a team that
knows how its bucket divides sets), so the estimators are measured on that kind of export too.
Probabilities are cached per target in --cache, so a rerun only recomputes the estimates.
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

from benchmarks.quality import ABLATION, CALIBRATED, team_prior
from must_engine import Predictor, adapt, resolve_job_config
from must_engine.bucket import label_batches
from must_engine.estimate import ESTIMATORS, BucketEvidence
from must_engine.evaluate import class_key, labelled_folders

ADAPTATIONS: dict[str, dict[str, Any]] = {"auto": {}, "calibrated": {**CALIBRATED, **ABLATION["must"]}}


def collect(
    target: Path, cache: Path, *, adaptation: str, class_prior: str, base_model: str, device: str
) -> dict[str, Any]:
    """Both models' probabilities on every image of the target, with the true labels (cached as .npz)."""
    path = cache / f"{target.name}.npz"
    if not path.exists():
        started = time.perf_counter()
        folders = labelled_folders(target)
        class_names = list(folders)
        samples = [(image, name) for name, images in folders.items() for image in images]
        zero_shot = Predictor.zero_shot(base_model, class_names, device=device)
        labels = torch.tensor([class_names.index(name) for _, name in samples])
        prior = team_prior(labels, len(class_names), class_prior, seed=0)
        overrides = {**ADAPTATIONS[adaptation], **({"class_prior": list(prior)} if prior else {})}
        config = resolve_job_config("auto", overrides, num_images=len(samples),
                                    num_classes=len(class_names), base_model=base_model)
        with tempfile.TemporaryDirectory() as out:
            result = adapt(target, class_names, Path(out), base_model=base_model, config=config, device=device)
            adapted = Predictor.load(Path(out), device=device)
        index = {class_key(name): i for i, name in enumerate(adapted.class_names)}
        named = [(image, image.relative_to(target).as_posix()) for image, _ in samples]
        batches = list(label_batches(named, adapted, zero_shot))
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            labels=np.array([index[class_key(name)] for _, name in samples]),
            adapted=torch.cat([b.adapted for b in batches]).numpy(),
            zero_shot=torch.cat([b.zero_shot for b in batches]).numpy(),
            class_names=np.array(adapted.class_names),
            adaptation=np.array(adaptation),
            class_prior=np.array(class_prior),
            agreement=np.array(result.metrics.get("agreement", np.nan)),
        )
        print(f"  {target.name}: adapted and labelled in {time.perf_counter() - started:.0f} s", flush=True)
    data = np.load(path)
    cached = str(data["adaptation"]) if "adaptation" in data.files else "calibrated"  # caches written before the choice
    cached_prior = str(data["class_prior"]) if "class_prior" in data.files else "none"  # written before the flag
    if (cached, cached_prior) != (adaptation, class_prior):
        raise SystemExit(f"{path} holds the {cached!r} adaptation with class prior {cached_prior!r}, not "
                         f"{adaptation!r} with {class_prior!r}: use another --cache")
    return {**{key: data[key] for key in data.files}, "class_prior": np.array(cached_prior)}


def score_target(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """True top-1 and every estimator's estimate, for the adapted and the zero-shot model."""
    labels = torch.from_numpy(data["labels"])
    adapted, zero_shot = torch.from_numpy(data["adapted"]), torch.from_numpy(data["zero_shot"])
    evidence = BucketEvidence(list(data["class_names"]))
    evidence.add(adapted, zero_shot)
    prior = team_prior(labels, adapted.shape[1], str(data["class_prior"]), seed=0)  # what the export was balanced to
    truth = {"adapted": float((adapted.argmax(-1) == labels).float().mean()),
             "zero_shot": float((zero_shot.argmax(-1) == labels).float().mean())}
    out: dict[str, dict[str, float]] = {"true": truth}
    for name in ESTIMATORS:
        out[name] = evidence.estimate(name, prior)
    return out


def summarise(table: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per estimator, in points: mean |estimate - true| (each model, both), the largest, the mean signed error;
    and on how many targets it orders adapted vs zero-shot as the truth does."""
    summary = {}
    for name in ESTIMATORS:
        signed = [(r[name][m] - r["true"][m]) * 100 for r in table.values() for m in ("zero_shot", "adapted")]
        errors = {m: [abs(r[name][m] - r["true"][m]) * 100 for r in table.values()] for m in ("zero_shot", "adapted")}
        ranked = sum(_ranked(r["true"], r[name]) for r in table.values())
        summary[name] = {"mae_zero_shot": float(np.mean(errors["zero_shot"])),
                         "mae_adapted": float(np.mean(errors["adapted"])),
                         "mae": float(np.mean(errors["zero_shot"] + errors["adapted"])),
                         "max_error": float(max(errors["zero_shot"] + errors["adapted"])),
                         "bias": float(np.mean(signed)),
                         "ranked": ranked, "targets": len(table)}
    return summary


def _ranked(truth: dict[str, float], estimate: dict[str, float]) -> bool:
    """The estimate orders adapted and zero-shot as the truth does (a true tie counts as either order)."""
    true_gain = truth["adapted"] - truth["zero_shot"]
    estimated_gain = estimate["adapted"] - estimate["zero_shot"]
    return true_gain == 0 or (true_gain > 0) == (estimated_gain > 0)


def print_tables(table: dict[str, dict[str, dict[str, float]]], summary: dict[str, dict[str, float]]) -> None:
    print("\n| estimator | MAE zero-shot | MAE adapted | MAE both | max error | mean signed error | ranks right |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['mae_zero_shot']:.2f} | {s['mae_adapted']:.2f} | {s['mae']:.2f} | "
              f"{s['max_error']:.2f} | {s['bias']:+.2f} | {s['ranked']} / {s['targets']} |")
    for name in ESTIMATORS:
        print(f"\n{name}:\n| target | true zero-shot | est. | abs. error | true adapted | est. | abs. error |")
        print("|---|---|---|---|---|---|---|")
        for target, r in table.items():
            cells = []
            for model in ("zero_shot", "adapted"):
                true, est = 100 * r["true"][model], 100 * r[name][model]
                cells += [f"{true:.1f}", f"{est:.1f}", f"{abs(est - true):.1f}"]
            print(f"| {target} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=Path, required=True, help="folder of labelled target folders")
    parser.add_argument("--cache", type=Path, required=True, help="per-target probabilities (.npz), reused")
    parser.add_argument("--adaptation", choices=sorted(ADAPTATIONS), default="auto",
                        help="auto: the product's default; calibrated: the paper's MUST (section 2's settings)")
    parser.add_argument("--class-prior", choices=("none", "true"), default="none",
                        help="true: the adaptation gets the target's true class shares as class_prior")
    parser.add_argument("--base-model", default="proxy-cifar10-tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args()
    targets = sorted(p for p in args.targets.iterdir() if p.is_dir())
    table = {t.name: score_target(collect(t, args.cache, adaptation=args.adaptation, class_prior=args.class_prior,
                                          base_model=args.base_model, device=args.device)) for t in targets}
    summary = summarise(table)
    print_tables(table, summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "targets": table}, indent=2))


if __name__ == "__main__":
    main()
