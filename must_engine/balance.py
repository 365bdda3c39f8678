"""Class balancing over the bucket: per-class logit offsets that move the predicted classes to a target marginal.

The fairness term of MUST pushes the *mean* prediction towards the uniform class marginal; on a shifted
domain the classifier still favours some classes (CLIP's label bias, made worse by the shift). Sinkhorn-Knopp
finds the assignment closest to the model's probabilities whose class marginal is uniform (SeLa, SwAV), and
its column scaling v is exactly a per-class offset: argmax_k P_ik v_k = argmax_k (logit_ik + log v_k). Folded
into the exported head as `class_bias`, it applies to every later image of the domain too, not only the bucket
(a prior correction in the sense of Saerens et al. 2002 and the logit adjustment of Zhu et al. 2023).
The target is uniform unless the job gives the bucket's class prior (must_engine/prior.py): uniform is right
for a balanced bucket and wrong for a long-tailed one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from must_engine.augment import eval_transform, to_batch
from must_engine.images import ImageError, open_image
from must_engine.models import ImageClassifier
from must_engine.prior import target_marginal


def sinkhorn_class_bias(probs: torch.Tensor, prior: Sequence[float] = (), iterations: int = 100) -> torch.Tensor:
    """(N, K) class probabilities -> (K,) zero-mean logit offsets of the balanced assignment: the one whose
    class marginal is `prior` (must_engine/prior.py), uniform when none is given."""
    p = probs.double().clamp(min=1e-12)
    n, k = p.shape
    columns = n * target_marginal(prior, k)
    v = torch.ones(k, dtype=torch.float64)
    for _ in range(iterations):
        u = 1.0 / (p @ v)  # rows of diag(u) P diag(v) sum to 1
        v = columns / (p.T @ u)  # its columns to n x the class's share
    bias = v.log()
    return (bias - bias.mean()).float()


def balanced_log_probs(
    probs: torch.Tensor, bias: torch.Tensor | None = None, prior: Sequence[float] = ()
) -> torch.Tensor:
    """(N, K) unnormalised log-probabilities of the balanced assignment, log P_ik + log v_k (its argmax is the
    balanced labels); `bias` when the offsets of these probabilities are already known."""
    return probs.clamp(min=1e-12).log() + (sinkhorn_class_bias(probs, prior) if bias is None else bias)


@torch.inference_mode()
def bucket_logits(
    classifier: ImageClassifier, paths: Sequence[Path], preprocess: dict[str, Any], device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """(N, K) logits of every readable bucket image, with the serving preprocessing (center crop), on the CPU."""
    transform = eval_transform(preprocess["size"], preprocess["mean"], preprocess["std"])
    was_training = classifier.training
    classifier.eval()
    chunks = []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            with contextlib.suppress(ImageError):  # unreadable since validation: it carries no signal
                images.append(open_image(path, draft_size=2 * preprocess["size"]))
        if images:
            chunks.append(classifier(to_batch(images, transform).to(device)).float().cpu())
    classifier.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, classifier.num_classes)


def balance_classes(
    classifier: ImageClassifier, logits: torch.Tensor, known: torch.Tensor | None = None,
    prior: Sequence[float] = (),
) -> dict[str, float]:
    """Set `classifier.class_bias` from the bucket's (N, K) logits (made with a zero bias), balancing over the
    images `known` marks (all when None) to the class `prior` (uniform when none); returns label-free figures
    of what it changed."""
    probs = logits.softmax(dim=-1)
    if known is not None and int(known.sum()) >= classifier.num_classes:
        probs = probs[known]
    bias = sinkhorn_class_bias(probs, prior)
    before = probs.argmax(dim=-1)
    after = balanced_log_probs(probs, bias).argmax(dim=-1)
    classifier.class_bias.copy_(bias.to(classifier.class_bias.device))
    counts = torch.bincount(after, minlength=classifier.num_classes).float()
    return {
        "balance_changed": float((before != after).float().mean()),  # share of bucket predictions moved
        "balance_max_bias": float(bias.abs().max()),
        "balance_class_share_max": float(counts.max() / counts.sum()),
    }
