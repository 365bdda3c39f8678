"""Proxy CLIP: contrastive image-caption pretraining of a small open_clip model on a labelled image set.

Real CLIP weights cannot be downloaded here, so MUST is measured on a proxy with the same structure: a CLIP-style
model whose captions are prompt templates filled with the class name, trained with open_clip's own ``ClipLoss``,
then used zero-shot on shifted images. The output directory is open_clip's ``local-dir:`` format, so
``open_clip.create_model("local-dir:DIR")`` loads it offline and the engine accepts it as a base model.

    python -m benchmarks.proxy_clip --preset tiny --out must_engine/base_models/proxy-cifar10-tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import set_model_preprocess_cfg
from PIL import Image
from safetensors.torch import save_file

from benchmarks import SHARED_DATASETS
from must_engine.evaluate import labelled_folders

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "proxy_configs"
CIFAR10_DIR = SHARED_DATASETS / "cifar10"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

# CLIP's CIFAR prompts plus its 7-template ImageNet ensemble (the engine's default set), so the proxy has seen
# every word of the prompts it will later be zero-shot with.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
    "a picture of the {}.",
    "a photo of the {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


@dataclass(frozen=True)
class Recipe:
    """How to train; the architecture lives in proxy_configs/<model>.json."""

    model: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    crop_pad: int = 4  # random-crop padding, in pixels of the stored images
    grad_clip: float = 1.0


PRESETS: dict[str, Recipe] = {
    # 2 CPU cores, about 36 minutes; ships in the repository.
    "tiny": Recipe("proxy-tiny", epochs=10, batch_size=128, lr=1e-3, weight_decay=0.1, warmup_steps=200),
    # One GPU, a few minutes.
    "small": Recipe("proxy-small", epochs=100, batch_size=512, lr=5e-4, weight_decay=0.1, warmup_steps=500),
}


@dataclass
class LabelledImages:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, indices into classes
    classes: list[str]


def load_labelled(path: Path, size: int | None = None) -> LabelledImages:
    """An npz with images/labels/classes (used as stored), or a folder root/<class>/<images> resized to size."""
    if path.suffix == ".npz":
        with np.load(path) as data:
            return LabelledImages(data["images"], data["labels"].astype(np.int64), [str(c) for c in data["classes"]])
    folders = labelled_folders(path)  # the engine's reading of root/<class>/, as `must eval` does
    images, labels = [], []
    for label, files in enumerate(folders.values()):
        for file in files:
            with Image.open(file) as img:
                images.append(resize_and_crop(img.convert("RGB"), size))
            labels.append(label)
    return LabelledImages(np.stack(images), np.array(labels, dtype=np.int64), list(folders))


def resize_and_crop(img: Image.Image, size: int | None) -> np.ndarray:
    """Shorter side to size, then centre crop: the same geometry as open_clip's eval transform."""
    if size is not None and img.size != (size, size):
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def load_model_config(name: str) -> dict[str, Any]:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def preprocess_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's defaults (CLIP's mean/std), at the model's input size."""
    return {
        "size": model_cfg["vision_cfg"]["image_size"],
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def build_model(model_cfg: dict[str, Any]) -> open_clip.CLIP:
    model = open_clip.CLIP(**model_cfg, output_dict=True)
    set_model_preprocess_cfg(model, preprocess_config(model_cfg))
    return model


def tokenize_captions(tokenizer: open_clip.SimpleTokenizer, classes: Sequence[str]) -> torch.Tensor:
    """(templates, classes, context) token ids; refuses captions the context would silently truncate."""
    texts = [t.format(c) for t in TEMPLATES for c in classes]
    longest = max(texts, key=lambda text: len(tokenizer.encode(text)))
    if len(tokenizer.encode(longest)) + 2 > tokenizer.context_length:
        raise ValueError(f"caption {longest!r} does not fit the context length {tokenizer.context_length}")
    return tokenizer(texts).view(len(TEMPLATES), len(classes), -1)


def augment(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of a reflect-padded batch plus horizontal flip, as one gather on x's device."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=gen).to(x.device)
    flip = (torch.rand(n, 1, generator=gen) < 0.5).to(x.device)
    cols = torch.arange(w, device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.where(flip, cols.flip(0), cols))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def model_input(model: open_clip.CLIP, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] (N, 3, H, W) -> what the model expects, following its preprocess_cfg."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(cfg["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, H, W) on device; converted to float one batch at a time."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)


def lr_at(step: int, recipe: Recipe, total_steps: int) -> float:
    """Linear warmup, then cosine decay to zero."""
    warmup = min(recipe.warmup_steps, total_steps // 10)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on gains, biases and the logit scale, as in open_clip's training script."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainStats:
    steps: int
    epoch_losses: list[float]
    seconds: float

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1]


def fit(
    model: open_clip.CLIP,
    data: LabelledImages,
    recipe: Recipe,
    *,
    max_steps: int | None = None,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
) -> TrainStats:
    """Contrastive training on (image, random-template caption) pairs; one caption per image per step."""
    gen = torch.Generator().manual_seed(seed)
    tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
    captions = tokenize_captions(tokenizer, data.classes).to(device)
    images, labels = to_tensor(data.images, device), torch.from_numpy(data.labels).to(device)
    batch_size = min(recipe.batch_size, len(labels))
    steps_per_epoch = len(labels) // batch_size
    total_steps = recipe.epochs * steps_per_epoch if max_steps is None else max_steps
    optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    model.to(device).train()

    epoch_losses: list[float] = []
    running: list[torch.Tensor] = []
    start = epoch_start = time.perf_counter()
    for step in range(total_steps):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0:
            order = torch.randperm(len(labels), generator=gen).to(device)
        idx = order[i * batch_size : (i + 1) * batch_size]
        x = model_input(model, augment(images[idx].float().div_(255), recipe.crop_pad, gen))
        template = torch.randint(len(TEMPLATES), (len(idx),), generator=gen).to(device)
        text = captions[template, labels[idx]]

        lr = lr_at(step, recipe, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x, text)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running.append(loss.detach())

        if i == steps_per_epoch - 1 or step == total_steps - 1:
            epoch_losses.append(torch.stack(running).mean().item())
            now = time.perf_counter()
            print(
                f"epoch {epoch + 1} step {step + 1}/{total_steps} loss {epoch_losses[-1]:.4f} lr {lr:.2e} "
                f"logit_scale {model.logit_scale.exp().item():.1f} "
                f"{len(running) * batch_size / (now - epoch_start):.0f} img/s elapsed {now - start:.0f}s",
                flush=True,
            )
            running, epoch_start = [], now
    return TrainStats(total_steps, epoch_losses, time.perf_counter() - start)


@torch.no_grad()
def zero_shot_accuracy(
    model: open_clip.CLIP,
    tokenizer: open_clip.SimpleTokenizer,
    data: LabelledImages,
    class_names: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
    batch_size: int = 500,
) -> float:
    """Top-1 of CLIP's zero-shot head (per class: mean of normalised template embeddings, renormalised)."""
    device = next(model.parameters()).device
    model.eval()
    head = open_clip.build_zero_shot_classifier(
        model, tokenizer, list(class_names), list(templates), num_classes_per_batch=None, device=device
    )
    to_head = torch.tensor([list(class_names).index(c) for c in data.classes], device=device)
    labels = to_head[torch.from_numpy(data.labels).to(device)]
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = to_tensor(data.images[start : start + batch_size], device).float().div_(255)
        features = model.encode_image(model_input(model, x), normalize=True)
        correct += (features @ head).argmax(dim=1).eq(labels[start : start + batch_size]).sum().item()
    return correct / len(labels)


def save_weights(model: open_clip.CLIP, out_dir: Path) -> None:
    """fp16 halves the file; open_clip loads it into its fp32 model unchanged (fp16 values are exact in fp32)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out_dir / WEIGHTS_FILE))


def write_config(out_dir: Path, model_cfg: dict[str, Any], proxy: dict[str, Any]) -> None:
    """open_clip's local-dir config, plus how the proxy was made under "proxy"."""
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(model_cfg), "proxy": proxy}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_proxy(
    model_dir: Path, device: str | torch.device = "cpu"
) -> tuple[open_clip.CLIP, open_clip.SimpleTokenizer, dict[str, Any]]:
    """The saved proxy through open_clip's own loader (fp32), its tokenizer and its 'proxy' metadata."""
    spec = f"local-dir:{model_dir}"
    model = open_clip.create_model(spec, device=device)
    config = json.loads((Path(model_dir) / CONFIG_FILE).read_text())
    return model, open_clip.get_tokenizer(spec), config.get("proxy", {})


def repo_relative(path: Path) -> str:
    """Paths as recorded in the config: relative to the repository, so they mean the same on every machine."""
    return os.path.relpath(path.resolve(), REPO_ROOT)


def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="output directory (open_clip local-dir format)")
    parser.add_argument("--data", type=Path, default=CIFAR10_DIR / "train.npz", help="labelled .npz or root/<class>/")
    parser.add_argument("--eval-data", type=Path, default=CIFAR10_DIR / "test.npz", help="labelled .npz or folder")
    parser.add_argument("--no-eval", action="store_true", help="skip the clean zero-shot evaluation")
    parser.add_argument("--epochs", type=int, help="override the preset")
    parser.add_argument("--batch-size", type=int, help="override the preset")
    parser.add_argument("--lr", type=float, help="override the preset")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr") if getattr(args, k) is not None}
    recipe = dataclasses.replace(PRESETS[args.preset], **overrides)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)

    model_cfg = load_model_config(recipe.model)
    data = load_labelled(args.data, model_cfg["vision_cfg"]["image_size"])
    model = build_model(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{recipe.model}: {n_params / 1e6:.2f}M parameters, {len(data.labels)} images, "
          f"{len(data.classes)} classes, device {device}", flush=True)
    stats = fit(model, data, recipe, max_steps=args.max_steps, seed=args.seed, device=device)

    proxy = {
        "preset": args.preset,
        "recipe": dataclasses.asdict(recipe),
        "dataset": repo_relative(args.data),
        "classes": data.classes,
        "templates": list(TEMPLATES),
        "parameters": n_params,
        "steps": stats.steps,
        "epoch_losses": [round(loss, 4) for loss in stats.epoch_losses],
        "final_loss": round(stats.final_loss, 4),
        "train_seconds": round(stats.seconds, 1),
        "device": str(device),
        "seed": args.seed,
        "command": shlex.join(["python", "-m", "benchmarks.proxy_clip", *(sys.argv[1:] if argv is None else argv)]),
    }
    save_weights(model, args.out)
    write_config(args.out, model_cfg, proxy)
    if not args.no_eval:
        # Measure what ships: the fp16 file reloaded by open_clip, not the in-memory fp32 model.
        loaded, tokenizer, _ = load_proxy(args.out, device)
        eval_data = load_labelled(args.eval_data, model_cfg["vision_cfg"]["image_size"])
        top1 = zero_shot_accuracy(loaded, tokenizer, eval_data, data.classes)
        proxy.update(eval_dataset=repo_relative(args.eval_data), clean_zero_shot_top1=round(top1, 4))
        write_config(args.out, model_cfg, proxy)
        print(f"clean zero-shot top-1 on {args.eval_data}: {top1:.4f}", flush=True)
    print(f"wrote {args.out}", flush=True)
    return proxy


if __name__ == "__main__":
    main()
