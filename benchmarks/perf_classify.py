"""Classification throughput through `must_engine.Predictor`, from tensors and from JPEG bytes.

Why: the service classifies through Predictor, so its chunking, host-device copies and preprocessing are
part of the cost. Two paths per batch size: preprocessed tensors (`Predictor.probabilities`, model cost
plus copies) and JPEG bytes (`open_image` decode + `Predictor.classify`: resize, crop, normalise, top-k),
both timed wall-clock with the results back on the host. HTTP load testing is not done here.

    python benchmarks/perf_classify.py --arch ViT-B-16 --device cuda --batch-sizes 1,8,32,64,128,256
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import torch
from perf_common import (
    CLIP_MEAN,
    CLIP_STD,
    DTD,
    build_classifier,
    describe_device,
    fmt,
    image_size,
    median,
    peak_memory_gib,
    print_table,
    rate,
    reset_peak_memory,
    time_calls,
)

from must_engine.images import find_images, open_image
from must_engine.predictor import Predictor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16",
                        help="open_clip architecture, tiny, tiny-224, or a model-config JSON file")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per batch size (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=-1,
                        help="Predictor.batch_size (images per forward); -1 = the engine's default, 0 = whole batch")
    parser.add_argument("--root", type=Path, default=DTD, help="JPEG files for the bytes path (read-only)")
    parser.add_argument("--skip-jpeg", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--preprocess-threads", type=int, help="Predictor's resize pool (default: min(8, cores))")
    parser.add_argument("--onnx", action="store_true",
                        help="also time the ONNX export under ONNX Runtime (CPU) on the same pixels, with the "
                             "largest probability difference to PyTorch")
    parser.add_argument("--proxy", action="store_true", help="the shipped offline base model instead of --arch")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.proxy:  # real weights: the model the embedded defaults serve
        from must_engine import DEFAULT_BASE_MODEL

        zero_shot = Predictor.zero_shot(DEFAULT_BASE_MODEL, [f"class {i}" for i in range(args.classes)], device="cpu")
        classifier, preprocess, args.arch = zero_shot.classifier, zero_shot.preprocess_config, DEFAULT_BASE_MODEL
    else:
        classifier = build_classifier(args.arch, args.classes)
        preprocess = {"size": image_size(classifier), "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    size = int(preprocess["size"])
    names = [f"class {i}" for i in range(args.classes)]
    predictor = Predictor(classifier, names, preprocess, metadata={}, device=args.device,
                          preprocess_threads=args.preprocess_threads)
    session = _onnx_session(predictor) if args.onnx else None
    default_chunk = predictor.batch_size
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    files = [path.read_bytes() for path in itertools.islice(itertools.cycle(find_images(args.root)), max(sizes))]
    print(f"# Predictor: {args.arch} ({size}px, {args.classes} classes), {describe_device(device)}, "
          f"chunk {'engine default ' + str(default_chunk) if args.chunk < 0 else args.chunk or 'whole batch'}, "
          f"{args.iters} timed calls after {args.warmup}; JPEGs from {args.root}")

    rows = []
    for batch in sizes:
        predictor.batch_size = default_chunk if args.chunk < 0 else (args.chunk or batch)
        pixels = torch.randn(batch, 3, size, size)
        jpegs = files[:batch]
        reset_peak_memory(device)
        tensor_s = median(time_calls(lambda: predictor.probabilities(pixels), device,  # noqa: B023
                                     warmup=args.warmup, repeats=args.iters, wall_clock=True))
        jpeg_s = None
        if not args.skip_jpeg:
            def from_bytes() -> None:
                predictor.classify([open_image(data, filename="image.jpg") for data in jpegs])  # noqa: B023

            jpeg_s = median(time_calls(from_bytes, device, warmup=args.warmup, repeats=args.iters, wall_clock=True))
        row = [
            str(batch), rate(batch / tensor_s), f"{tensor_s * 1e3:.1f}",
            rate(None if jpeg_s is None else batch / jpeg_s), fmt(None if jpeg_s is None else jpeg_s * 1e3),
            fmt(peak_memory_gib(device), ".2f"),
        ]
        if session is not None:
            row += _onnx_columns(session, predictor, files[:batch], args)
        rows.append(row)
    headers = ["batch", "tensors images/s", "tensors ms/batch", "JPEG images/s", "JPEG ms/batch", "peak GiB"]
    if session is not None:
        headers += ["ORT images/s", "ORT ms/batch", "torch ms/batch (same pixels)", "max |ORT - torch|", "same top-1"]
    print_table(headers, rows)


def _onnx_session(predictor: Predictor) -> Any:
    import onnxruntime

    from must_engine.onnx_export import export_onnx

    model = export_onnx(predictor.classifier.cpu(), predictor.class_names, predictor.preprocess_config, {})
    predictor.classifier.to(predictor.device)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same cores as torch
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _onnx_columns(session: Any, predictor: Predictor, jpegs: list[bytes], args: argparse.Namespace) -> list[str]:
    """ORT against torch on the same uint8 pixels (resize + crop done once, outside the timing)."""
    from must_engine.onnx_export import INPUT_NAME, pixels_for_onnx

    images = [open_image(data, filename="image.jpg") for data in jpegs]
    pixels = pixels_for_onnx(images, predictor.size)
    normalised = predictor.preprocess(images)
    cpu = torch.device("cpu")
    ort_s = median(time_calls(lambda: session.run(None, {INPUT_NAME: pixels}), cpu,
                              warmup=args.warmup, repeats=args.iters, wall_clock=True))
    torch_s = median(time_calls(lambda: predictor.probabilities(normalised), cpu,
                                warmup=args.warmup, repeats=args.iters, wall_clock=True))
    (ort_probs,) = session.run(None, {INPUT_NAME: pixels})
    torch_probs = predictor.probabilities(normalised).numpy()
    same = bool((ort_probs.argmax(1) == torch_probs.argmax(1)).all())
    return [rate(len(jpegs) / ort_s), f"{ort_s * 1e3:.1f}", f"{torch_s * 1e3:.1f}",
            f"{abs(ort_probs - torch_probs).max():.1e}", "yes" if same else "no"]


if __name__ == "__main__":
    main()
