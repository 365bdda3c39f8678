"""The `must` command line: adapt, eval, classify, export (and, when the service is installed, serve/admin)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from must_engine.artifact import is_artifact
from must_engine.base_models import DEFAULT_BASE_MODEL, BaseModelError, geometry, parse_base_model
from must_engine.bucket import RowsFile
from must_engine.config import ConfigError, resolve_config
from must_engine.data import NoImagesError, collect_images
from must_engine.images import ArchiveError, ImageError, open_image
from must_engine.predictor import Predictor
from must_engine.presets import PRESETS

USER_ERRORS = (ConfigError, BaseModelError, ImageError, ArchiveError, NoImagesError, FileNotFoundError, ValueError)

SKEWED_DISAGREES = ("the two estimates disagree about which model is better: the difference rests on the bucket's "
                    "classes being about equally frequent; if they are not, set class_prior or audit a few "
                    "labelled images")


def parse_class_names(value: str) -> list[str]:
    """A comma-separated list, or a file: a JSON array or one name per line."""
    path = Path(value)
    if path.is_file():
        text = path.read_text()
        if text.lstrip().startswith("["):
            names = json.loads(text)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path}: expected a JSON array of strings")
            return names
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [name.strip() for name in value.split(",")]


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _load_predictor(model: str, classes: str | None, device: str) -> Predictor:
    if is_artifact(Path(model)):
        if classes:
            raise ValueError("--classes applies to base models; an adapted model has its own classes")
        return Predictor.load(Path(model), device=device)
    if not classes:
        raise ValueError(f"{model} is not an adapted model directory; zero-shot on a base model needs --classes")
    return Predictor.zero_shot(model, parse_class_names(classes), device=device)


def cmd_adapt(args: argparse.Namespace) -> int:
    """One process, or (--nproc N) this command again as N ranks under torchrun; then each rank runs it."""
    from must_engine import distributed

    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and not distributed.launched_as_rank():
        from must_engine.launch import torchrun_main

        return torchrun_main(args.nproc, _without_nproc(args.argv))
    main_rank = distributed.init_process_group(args.device).is_main
    try:
        with tempfile.TemporaryDirectory(prefix="must-rank-") as scratch:
            return _adapt(args, main_rank, Path(scratch))
    finally:
        distributed.shutdown()


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line for the ranks (torchrun would take `--nproc` for its own `--nproc-per-node`)."""
    kept: list[str] = []
    skip = False
    for item in argv:
        if not skip and item != "--nproc" and not item.startswith("--nproc="):
            kept.append(item)
        skip = item == "--nproc"
    return kept


def _adapt(args: argparse.Namespace, main_rank: bool, scratch: Path) -> int:
    """The run on this rank; rank 0 alone extracts into the work directory and writes what follows training."""
    from tqdm import tqdm

    from must_engine.train import Progress, adapt, clear_work_dir

    class_names = parse_class_names(args.classes)
    overrides = dict(parse_override(item) for item in args.set)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    spec = parse_base_model(args.base_model, args.pretrained)
    out_dir = Path(args.out)
    work_dir = Path(args.work_dir) if args.work_dir else out_dir.with_name(out_dir.name + ".work")
    source = Path(args.images)
    # What prediction names are relative to; ranks other than 0 extract a zip into a scratch copy of their own.
    extract_to = work_dir / "images" if main_rank else scratch
    images_root = extract_to if source.suffix == ".zip" else source
    paths = collect_images(source, images_root) if source.suffix == ".zip" else collect_images(source)
    if args.predictions:
        RowsFile(Path(args.predictions))  # a wrong suffix fails now, not after training
    config = resolve_config(args.preset, overrides, num_images=len(paths), num_classes=len(class_names),
                            geometry=geometry(spec), class_names=class_names)
    bar = tqdm(total=None, unit="step", dynamic_ncols=True, disable=args.quiet or not main_rank)

    def show(progress: Progress) -> None:
        bar.total = progress.total_steps
        bar.n = progress.step
        if progress.message:
            bar.write(progress.message)
        if progress.metrics:
            keys = ("loss", "loss_st", "loss_mim", "above_tau", "agreement", "images_per_s")
            bar.set_postfix({k: f"{progress.metrics[k]:.3g}" for k in keys if k in progress.metrics})
        bar.refresh()

    result = adapt(paths, class_names, out_dir, base_model=spec.spec, config=config, device=args.device,
                   work_dir=work_dir, on_progress=show)
    bar.close()
    if not main_rank:
        return 0
    if args.predictions:
        _write_predictions(paths, images_root, result.artifact_dir, Path(args.predictions), args)
    if not args.keep_checkpoint:
        clear_work_dir(work_dir)
    print(f"adapted model written to {result.artifact_dir}")
    return 0


def _write_predictions(paths: list[Path], root: Path, artifact_dir: Path, out: Path, args: argparse.Namespace) -> None:
    """Label every image with the adapted model and zero-shot; print the label-free report."""
    from tqdm import tqdm

    from must_engine.bucket import label_bucket

    named = [(path, path.relative_to(root).as_posix() if root.is_dir() else path.name) for path in paths]
    bar = tqdm(total=len(named), unit="image", desc="labelling", dynamic_ncols=True, disable=args.quiet)
    with RowsFile(out) as sink:
        report = label_bucket(named, artifact_dir, on_rows=sink.write, device=args.device,
                              on_progress=lambda done, _: bar.update(done - bar.n))
    bar.close()
    estimate = report["estimated_top1"]
    beyond = report["beyond_balancing"]
    to_prior = " to the job's class prior" if beyond.get("target") == "class_prior" else ""
    print(f"{sink.count} predictions written to {out}; "
          f"{100 * report['changed_from_zero_shot']:.1f}% changed from zero-shot; balancing zero-shot's "
          f"classes over the bucket{to_prior} alone changes {100 * beyond['class_balancing']:.1f}%; the adapted model "
          f"differs from that balanced assignment on {100 * beyond['adapted_differs']:.1f}%")
    unknown = report["unknown"]
    print(f"{100 * unknown['share']:.1f}% of the images look like no known class (ood_score above "
          f"{unknown['threshold']:.3f}). {unknown['how']}")
    assumes = "the job's class prior" if estimate["assumes"] == "class_prior" else "balanced classes"
    print(f"estimated top-1 ({estimate['estimator']}, label-free, assuming {assumes}): adapted "
          f"{100 * estimate['adapted']:.1f}%, zero-shot {100 * estimate['zero_shot']:.1f}%  "
          f"[{estimate['measured_error']['summary']}]")
    skewed = report["estimated_top1_if_skewed"]
    if skewed:
        print(f"if instead the classes divide as zero-shot's labels do ({_top_shares(skewed['class_shares'])}): "
              f"adapted {100 * skewed['adapted']:.1f}%, zero-shot {100 * skewed['zero_shot']:.1f}%  "
              f"[{skewed['measured_error']['summary']}]")
        if not skewed["same_order"]:
            print(SKEWED_DISAGREES)


def _top_shares(shares: dict[str, float], shown: int = 3) -> str:
    """The most frequent classes of a share table, as "cat 31%, dog 22%, ...": enough to recognise a skew."""
    ranked = sorted(shares.items(), key=lambda item: item[1], reverse=True)
    more = ", ..." if len(ranked) > shown else ""
    return ", ".join(f"{name} {100 * share:.0f}%" for name, share in ranked[:shown]) + more


def cmd_eval(args: argparse.Namespace) -> int:
    from must_engine.evaluate import evaluate, labelled_folders

    classes = args.classes
    if not is_artifact(Path(args.model)) and not classes:
        classes = ",".join(labelled_folders(Path(args.data)))  # zero-shot over the folder's classes
    result = evaluate(_load_predictor(args.model, classes, args.device), Path(args.data))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"top-1 {result.top1:.4f}  mean-per-class {result.mean_per_class:.4f}  n={result.n}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from must_engine.onnx_export import export_artifact_onnx

    if not is_artifact(Path(args.model)):
        raise ValueError(f"{args.model} is not an adapted model directory (model.safetensors + metadata.json)")
    out = export_artifact_onnx(Path(args.model), Path(args.out))
    print(f"wrote {out} ({out.stat().st_size} bytes): uint8 RGB images in, class probabilities out")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    predictor = _load_predictor(args.model, args.classes, args.device)
    images = [open_image(Path(path)) for path in args.images]
    if args.min_score is not None and not 0.0 <= args.min_score <= 1.0:
        raise ValueError("--min-score must be between 0 and 1")
    results = predictor.classify_images(images, top_k=args.top_k, min_score=args.min_score)
    if args.json:
        print(json.dumps([
            {"filename": path, "predictions": [{"label": label, "score": score} for label, score in r.predictions],
             "ood_score": r.ood_score, "unknown": r.unknown}
            for path, r in zip(args.images, results, strict=True)
        ]))
    else:
        for path, r in zip(args.images, results, strict=True):
            verdict = f"UNKNOWN (ood_score {r.ood_score:.3f})" if r.unknown else f"known (ood_score {r.ood_score:.3f})"
            print(f"{path}: {verdict}: " + ", ".join(f"{label} {score:.3f}" for label, score in r.predictions))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="must", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    adapt = commands.add_parser("adapt", help="adapt a CLIP model to unlabeled images with MUST")
    adapt.add_argument("--images", required=True, help="folder (searched recursively) or .zip of images")
    adapt.add_argument("--classes", required=True, help="comma-separated names, or a file (JSON array or lines)")
    adapt.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="shipped name, ARCH:TAG or ARCH:PATH")
    adapt.add_argument("--pretrained", help="open_clip pretrained tag or weights path for --base-model ARCH")
    adapt.add_argument("--preset", default="auto", choices=PRESETS)
    adapt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    adapt.add_argument("--epochs", type=int)
    adapt.add_argument("--device", default="auto")
    adapt.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train on N processes under torchrun (one GPU each; gloo CPU processes without GPUs)")
    adapt.add_argument("--out", required=True, help="directory for the adapted model artifact")
    adapt.add_argument("--work-dir", help="checkpoint directory (default: OUT.work); a rerun resumes from it")
    adapt.add_argument("--keep-checkpoint", action="store_true")
    adapt.add_argument("--quiet", action="store_true", help="no progress bar")
    adapt.add_argument("--predictions", metavar="FILE",
                       help="also label every image with the adapted model and zero-shot, to FILE (.csv or .jsonl)")
    adapt.set_defaults(handler=cmd_adapt)

    evaluation = commands.add_parser("eval", help="top-1 and mean-per-class accuracy on a labelled folder")
    evaluation.add_argument("--model", required=True, help="adapted model directory or base model name")
    evaluation.add_argument("--data", required=True, help="folder laid out as root/<class name>/<images>")
    evaluation.add_argument("--classes", help="class names for a base model (default: the folder names)")
    evaluation.add_argument("--device", default="auto")
    evaluation.add_argument("--json", action="store_true")
    evaluation.set_defaults(handler=cmd_eval)

    classify = commands.add_parser("classify", help="top-k labels for images")
    classify.add_argument("--model", required=True, help="adapted model directory or base model name")
    classify.add_argument("images", nargs="+")
    classify.add_argument("--classes", help="class names for zero-shot with a base model")
    classify.add_argument("--top-k", type=int, default=5)
    classify.add_argument("--min-score", type=float,
                          help="call an image unknown when 1 - its ood_score is below this, 0..1 (default: the "
                          "model's threshold, fitted on its bucket)")
    classify.add_argument("--device", default="auto")
    classify.add_argument("--json", action="store_true")
    classify.set_defaults(handler=cmd_classify)

    export = commands.add_parser("export", help="write an adapted model as ONNX (images in, probabilities out)")
    export.add_argument("--model", required=True, help="adapted model directory")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--out", required=True, help="the .onnx file to write")
    export.set_defaults(handler=cmd_export)

    # The service registers `serve` and `admin` here; the engine does not import it.
    for entry in entry_points(group="must.commands"):
        entry.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--nproc` re-runs under torchrun
    try:
        return int(args.handler(args))
    except USER_ERRORS as exc:
        code = getattr(exc, "code", None)
        print(f"must {args.command}: error{f' [{code}]' if code else ''}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
