"""Accuracy on a labelled folder `root/<class name>/<images>` (labels used here only, never in training)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from must_engine.images import find_images, open_image
from must_engine.predictor import Predictor


@dataclass
class EvalResult:
    top1: float
    mean_per_class: float
    n: int
    per_class: dict[str, float]
    # confusion[i][j]: images of the model's class i predicted as class j (rows and columns in class_names order).
    class_names: list[str]
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, object]:
        return {"top1": self.top1, "mean_per_class": self.mean_per_class, "n": self.n, "per_class": self.per_class,
                "class_names": self.class_names, "confusion": self.confusion}


def class_key(name: str) -> str:
    """How a folder name is matched to a class name: case, spacing and underscores ignored."""
    return " ".join(name.replace("_", " ").split()).casefold()


def labelled_folders(root: Path) -> dict[str, list[Path]]:
    subfolders = [p for p in sorted(Path(root).iterdir()) if p.is_dir() and not p.name.startswith(".")]
    folders = {p.name: find_images(p) for p in subfolders}
    folders = {name: images for name, images in folders.items() if images}
    if not folders:
        raise FileNotFoundError(f"{root}: expected class folders root/<class name>/<images>")
    return folders


def evaluate(predictor: Predictor, root: Path, batch_size: int = 256) -> EvalResult:
    folders = labelled_folders(root)
    index = {class_key(name): i for i, name in enumerate(predictor.class_names)}
    missing = [name for name in folders if class_key(name) not in index]
    if missing:
        raise ValueError(f"folders {missing} match no class of the model ({predictor.class_names})")
    samples = [(path, index[class_key(name)]) for name, paths in folders.items() for path in paths]
    predictions = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pixels = predictor.preprocess([open_image(path, draft_size=2 * predictor.size) for path, _ in chunk])
        predictions.append(predictor.probabilities(pixels).argmax(dim=-1))
    predicted = torch.cat(predictions)
    labels = torch.tensor([label for _, label in samples])
    correct = predicted == labels
    per_class = {
        predictor.class_names[label]: float(correct[labels == label].float().mean())
        for label in sorted(set(labels.tolist()))
    }
    k = len(predictor.class_names)
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    return EvalResult(
        top1=float(correct.float().mean()),
        mean_per_class=sum(per_class.values()) / len(per_class),
        n=len(samples),
        per_class=per_class,
        class_names=list(predictor.class_names),
        confusion=confusion.tolist(),
    )
