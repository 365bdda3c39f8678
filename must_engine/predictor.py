"""Serving: classify images with an adapted artifact, or zero-shot with a base model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from must_engine.artifact import load_artifact, preprocess_metadata
from must_engine.augment import eval_transform, to_batch
from must_engine.base_models import FetchWeights
from must_engine.config import pick_device
from must_engine.models import ImageClassifier
from must_engine.unknown import DEFAULT_MIN_SCORE, is_unknown, ood_score, threshold_from_min_score

Prediction = list[tuple[str, float]]

# Below this many images, handing them to a thread pool costs more than resizing them in turn.
_PARALLEL_PREPROCESS_MIN = 8


class Predictor:
    """An ImageClassifier with its class names and preprocessing; thread-compatible, inference only."""

    def __init__(
        self, classifier: ImageClassifier, class_names: Sequence[str], preprocess: dict[str, Any],
        metadata: dict[str, Any], device: str = "auto", batch_size: int | None = None,
        preprocess_threads: int | None = None,
    ) -> None:
        if classifier.num_classes != len(class_names):
            raise ValueError(f"head has {classifier.num_classes} classes, metadata names {len(class_names)}")
        self.device = pick_device(device)
        self.classifier = classifier.eval().to(self.device)
        self.class_names = list(class_names)
        self.metadata = metadata
        self.preprocess_config = dict(preprocess)  # size, mean, std, ...: what an ONNX export needs
        self.size = int(preprocess["size"])
        self.transform = eval_transform(self.size, preprocess["mean"], preprocess["std"])
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 64)
        # PIL's resize and crop release the GIL, so resizing a batch on several threads scales with cores;
        # the transform is deterministic, so threads cannot change a result.
        threads = preprocess_threads if preprocess_threads is not None else min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="preprocess") if threads > 1 else None

    @classmethod
    def load(cls, artifact_dir: Path, device: str = "auto") -> Predictor:
        classifier, metadata = load_artifact(Path(artifact_dir))
        return cls(classifier, metadata["class_names"], metadata["preprocess"], metadata, device)

    @classmethod
    def zero_shot(
        cls, base_model: str, class_names: Sequence[str], pretrained: str | None = None,
        device: str = "auto", templates: str = "default", fetch_weights: FetchWeights | None = None,
    ) -> Predictor:
        from must_engine.base_models import load_base_model
        from must_engine.config import normalize_class_names
        from must_engine.zeroshot import zero_shot_classifier

        names = normalize_class_names(class_names)
        base = load_base_model(base_model, pretrained, fetch_weights=fetch_weights)
        classifier = zero_shot_classifier(base, names, templates)
        size = base.model.visual.image_size[0]
        metadata = {"base_model": base.spec.spec, "class_names": names, "zero_shot": True}
        return cls(classifier, names, preprocess_metadata(base.preprocess_cfg, size), metadata, device)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self._pool is None or len(images) < _PARALLEL_PREPROCESS_MIN:
            return to_batch(images, self.transform)
        return torch.stack(list(self._pool.map(self.transform, images)))

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed pixels -> (B, K) fp32 logits on the CPU, computed in batches."""
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        outputs = []
        with autocast:
            for start in range(0, len(pixels), self.batch_size):
                chunk = pixels[start : start + self.batch_size].to(self.device, non_blocking=True)
                outputs.append(self.classifier(chunk).float().cpu())
        return torch.cat(outputs) if outputs else torch.empty(0, len(self.class_names))

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed pixels -> (B, K) class probabilities."""
        return self.logits(pixels).softmax(dim=-1)

    @property
    def unknown_threshold(self) -> float:
        """The ood_score above which an image is of no known class: fitted on the bucket at adaptation time,
        or the no-bucket default for zero-shot models and artifacts made before it was fitted."""
        fitted = self.metadata.get("unknown")
        return float(fitted["threshold"]) if fitted else threshold_from_min_score(DEFAULT_MIN_SCORE)

    def ood_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of this predictor -> (B,) scores, higher = less like any class."""
        return ood_score(logits, self.classifier.class_bias.detach().cpu(), float(self.classifier.logit_scale))

    def classify_images(
        self, images: Sequence[Image.Image], top_k: int = 5, min_score: float | None = None
    ) -> list[Classification]:
        """Top-k (label, probability) per image, highest first, with the unknown decision: the model's fitted
        threshold, or `min_score` (the least 1 - ood_score an image of a known class may have)."""
        if not images:
            return []
        logits = self.logits(self.preprocess(images))
        scores = self.ood_scores(logits)
        threshold = self.unknown_threshold if min_score is None else threshold_from_min_score(min_score)
        flags = is_unknown(scores, threshold).tolist()
        return [
            Classification(row, score, flag)
            for row, score, flag in zip(top_predictions(logits.softmax(dim=-1), self.class_names, top_k),
                                        scores.tolist(), flags, strict=True)
        ]

    def classify(self, images: Sequence[Image.Image], top_k: int = 5) -> list[Prediction]:
        """Top-k (label, probability) per image, highest first."""
        return [result.predictions for result in self.classify_images(images, top_k)]


@dataclass(frozen=True)
class Classification:
    predictions: Prediction
    ood_score: float  # higher = less like any class (must_engine/unknown.py)
    unknown: bool


def top_predictions(probabilities: torch.Tensor, class_names: Sequence[str], k: int) -> list[Prediction]:
    """(N, K) probabilities -> the top-k (label, probability) of each row, highest first."""
    scores, indices = probabilities.topk(max(1, min(k, len(class_names))), dim=-1)
    return [
        [(class_names[i], float(s)) for s, i in zip(row_scores, row_indices, strict=True)]
        for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True)
    ]
