"""N ranks against one process on the same global batch: how far apart the adapted weights end up, and the
wall time of each (on CPU the time only proves the run; GPU scaling is measured with `must adapt --nproc`,
docs/BENCHMARKS.md section 7).

    python benchmarks/ddp_equivalence.py --nproc 2 --classes 3 --per-class 8

Both runs train the shipped proxy on DTD photographs (labels unused) with the same seed and global batch;
the ranks hold `micro` images per forward pass, the single process `nproc x micro`, so every global
micro-batch is the same set of images.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import SHARED_DATASETS  # noqa: E402
from must_engine import DEFAULT_BASE_MODEL, adapt, resolve_job_config  # noqa: E402
from must_engine.artifact import WEIGHTS_FILE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--classes", type=int, default=3, help="DTD classes (folders) to take")
    parser.add_argument("--per-class", type=int, default=8, help="images per class")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--micro", type=int, default=4, help="images per forward pass on each rank")
    parser.add_argument("--base-lr", type=float, default=1e-3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="must-ddp-") as scratch:
        images = Path(scratch) / "images"
        names = sorted(path.name for path in (SHARED_DATASETS / "dtd10").iterdir())[: args.classes]
        for name in names:
            (images / name).mkdir(parents=True)
            for path in sorted((SHARED_DATASETS / "dtd10" / name).glob("*.jpg"))[: args.per_class]:
                shutil.copy(path, images / name / path.name)
        run = {"epochs": args.epochs, "batch_size": args.batch, "num_workers": 0, "log_every": 1,
               "base_lr": args.base_lr, "min_lr": args.base_lr / 10, "tau": 0.45, "export": "student"}
        count = args.classes * args.per_class

        started = time.perf_counter()
        config = resolve_job_config("auto", {**run, "micro_batch_size": args.nproc * args.micro}, num_images=count,
                                    num_classes=len(names), base_model=DEFAULT_BASE_MODEL)
        single = adapt(images, names, Path(scratch) / "one", config=config, device="cpu")
        single_s = time.perf_counter() - started

        sets = [item for key, value in {**run, "micro_batch_size": args.micro}.items()
                for item in ("--set", f"{key}={value}")]
        started = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("must")), "adapt", "--images", str(images),
                        "--classes", ",".join(names), *sets, "--out", str(Path(scratch) / "ranks"),
                        "--nproc", str(args.nproc), "--device", "cpu", "--quiet"], check=True, capture_output=True)
        ranks_s = time.perf_counter() - started

        one, ranks = (load_file(str(Path(scratch) / name / WEIGHTS_FILE)) for name in ("one", "ranks"))
        worst, worst_name, key_bias = 0.0, "", 0.0
        for name, value in one.items():
            difference = (value - ranks[name]).abs()
            if name.endswith("attn.in_proj_bias"):  # [query | key | value]; the key part's gradient is 0
                width = difference.shape[0] // 3
                key_bias = max(key_bias, float(difference[width: 2 * width].max()))
                difference = torch.cat([difference[:width], difference[2 * width:]])
            if float(difference.max()) > worst:
                worst, worst_name = float(difference.max()), name
    print(f"{single.steps} steps of {args.batch} images, {count} images, base lr {args.base_lr} "
          f"(peak lr {config.lr:.3g})")
    print(f"max |one process - {args.nproc} ranks| over the weights: {worst:.3g} ({worst_name}); "
          f"attention key biases: {key_bias:.3g}")
    print(f"wall time: one process {single_s:.1f} s (in this process), {args.nproc} ranks {ranks_s:.1f} s "
          "(torchrun, interpreter start-up included)")


if __name__ == "__main__":
    main()
