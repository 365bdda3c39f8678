"""MUST's four losses, each a pure function so that it can be checked against hand-computed cases."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from must_engine.distributed import LOCAL_BATCH, LocalBatch


def self_training_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, tau: float, batch: LocalBatch = LOCAL_BATCH,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy to the teacher's hard pseudo-labels where its confidence >= tau.

    Averaged over the confident samples only (as the reference code does); a batch with none gives an
    exact, finite zero that still belongs to the graph, instead of the reference's NaN crash.
    `batch` says which micro-batch the mean is over (must_engine/distributed.py: the global one on N ranks).
    With per-sample `weights` (must_engine/unknown.py) it is their weighted average over the confident samples.
    """
    confidence, pseudo_labels = teacher_probs.max(dim=-1)
    keep = (confidence >= tau).to(torch.float32)
    per_sample = F.cross_entropy(student_logits.float(), pseudo_labels, reduction="none")
    weight = keep if weights is None else keep * weights.float()
    loss = batch.mean((per_sample * weight).sum(), weight.sum(), floor=1.0 if weights is None else 1e-12)
    return loss, keep.bool()


def fairness_loss(
    mean_probs: torch.Tensor, running_mean: torch.Tensor | None, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-mean_k log(p_bar_k): pushes the average prediction towards all classes.

    With momentum > 0 p_bar is a moving average (for more classes than a batch can cover); the loss is
    divided by (1 - momentum) so the current batch's gradient keeps the plain loss's scale (reference).
    Returns the loss and the detached average to carry to the next step.
    """
    if running_mean is None or momentum == 0:
        averaged = mean_probs
        scale = 1.0
    else:
        averaged = momentum * running_mean.detach() + (1 - momentum) * mean_probs
        scale = 1.0 / (1 - momentum)
    loss = -torch.log(averaged.float().clamp(min=1e-12)).mean() * scale
    return loss, averaged.detach()


def mim_loss(
    reconstruction: torch.Tensor, images: torch.Tensor, patch_mask: torch.Tensor, patch_size: int,
    batch: LocalBatch = LOCAL_BATCH,
) -> torch.Tensor:
    """L1 between predicted and input pixels at masked positions only (SimMIM), per channel."""
    pixel_mask = patch_mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)
    error = F.l1_loss(reconstruction.float(), images.float(), reduction="none")
    return batch.mean((error * pixel_mask).sum(), pixel_mask.sum()) / images.shape[1]


def align_loss(
    cls_embedding: torch.Tensor,
    patch_embeddings: torch.Tensor,
    patch_mask: torch.Tensor,
    *,
    target: str = "cls",
    k: int = 4,
    batch: LocalBatch = LOCAL_BATCH,
) -> torch.Tensor:
    """Mean squared distance between each [MSK] token's normalised embedding and its target.

    target="cls": the same image's normalised [CLS] embedding (the paper). target="nearest_k": the mean
    of the k spatially nearest visible patch embeddings (stop-gradient), a local variant.
    """
    masked = patch_mask.flatten(1).to(patch_embeddings.dtype)  # (B, N)
    if target == "cls":
        targets = cls_embedding.unsqueeze(1)
    elif target == "nearest_k":
        targets = _nearest_visible_mean(patch_embeddings.detach(), masked, k)
    else:
        raise ValueError(f"unknown alignment target {target!r}")
    distance = (patch_embeddings.float() - targets.float()).pow(2).sum(dim=-1)  # (B, N)
    return batch.mean((distance * masked).sum(), masked.sum())


def _nearest_visible_mean(embeddings: torch.Tensor, masked: torch.Tensor, k: int) -> torch.Tensor:
    batch, tokens, _ = embeddings.shape
    grid = int(tokens**0.5)
    coords = torch.stack(
        torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), dim=-1
    ).reshape(-1, 2).to(embeddings.device, torch.float32)
    distances = torch.cdist(coords, coords)  # (N, N)
    distances = distances.unsqueeze(0) + masked.unsqueeze(1).float() * 1e6  # never pick masked tokens
    k = min(k, tokens)
    nearest = distances.topk(k, dim=-1, largest=False).indices.reshape(batch, tokens * k)
    dim = embeddings.shape[-1]
    gathered = torch.gather(embeddings, 1, nearest.unsqueeze(-1).expand(-1, -1, dim))
    return F.normalize(gathered.reshape(batch, tokens, k, dim).mean(dim=2), dim=-1)


def align_distribution(
    probs: torch.Tensor, running_marginal: torch.Tensor | None, momentum: float, batch: LocalBatch = LOCAL_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher probabilities divided by their running class marginal, renormalised (ReMixMatch's alignment
    to a uniform target). Returns the aligned probabilities and the updated, detached marginal."""
    mean = batch.rows(probs).mean(dim=0).detach()
    marginal = mean if running_marginal is None else momentum * running_marginal + (1 - momentum) * mean
    aligned = probs / marginal.clamp(min=1e-12)
    return aligned / aligned.sum(dim=-1, keepdim=True), marginal
