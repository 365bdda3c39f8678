"""Peer methods the default adaptation must beat, on the same targets as benchmarks/quality.py.

Training-free and transductive (they see every image of the target at once, as bucket predictions do):
- `balanced`: Sinkhorn-Knopp rescaling of the zero-shot probabilities to the uniform class marginal that
  MUST's fairness term assumes (the balanced assignment of SwAV / SeLa), then argmax.
- `em_prior`: EM re-estimation of the target's class prior (Saerens, Latinne & Decaestecker, 2002), with the
  zero-shot head's implied prior taken as uniform, then the re-weighted posterior's argmax.
- `distribution_normalization`: the zero-shot head on image embeddings minus a share of their mean over the
  target (DN, Zhou et al. 2023), which corrects a skew without assuming the uniform class marginal.
- `label_propagation`: the balanced zero-shot labels diffused over the target's k-nearest-neighbour graph of
  image embeddings (Zhou et al. 2004; the transductive step of ZLaP, Stojnic et al. 2024, seeded with the
  zero-shot probabilities instead of text nodes), then balanced again.
A cheap tuning one:
- `tent`: entropy minimisation on the image tower's LayerNorm affine parameters (TENT, Wang et al. 2021), with
  the marginal-entropy (diversity) term of SHOT/UEO so that it cannot collapse onto one class; one pass.

Each function takes what zero-shot gives and returns class probabilities (N, K); labels are never read here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from must_engine.balance import balanced_log_probs
from must_engine.models import ImageClassifier


def sinkhorn_balance(probs: torch.Tensor, prior: Sequence[float] = ()) -> torch.Tensor:
    """The balanced assignment (rows sum to 1, columns to N/K, or to N x the class `prior`) through the offsets
    the product folds into its head (must_engine.balance), so the peer and `balance_classes` are one computation."""
    return balanced_log_probs(probs, prior=prior).softmax(dim=-1)


def em_prior(probs: torch.Tensor, iterations: int = 200, tolerance: float = 1e-7) -> torch.Tensor:
    """Posterior under the target prior that EM finds self-consistent with the zero-shot likelihoods."""
    k = probs.shape[1]
    source = torch.full((k,), 1.0 / k, dtype=torch.float64)
    prior = source.clone()
    posterior = probs.double()
    for _ in range(iterations):
        weighted = probs.double() * (prior / source)
        posterior = weighted / weighted.sum(dim=1, keepdim=True)
        updated = posterior.mean(dim=0)
        converged = float((updated - prior).abs().max()) < tolerance
        prior = updated
        if converged:
            break
    return posterior.float()


def label_propagation(
    embeddings: torch.Tensor, probs: torch.Tensor, *, k: int = 5, alpha: float = 0.5, power: float = 3.0,
    iterations: int = 20,
) -> torch.Tensor:
    """Z = alpha * S Z + (1 - alpha) * Y0 on the symmetric, normalised kNN graph S (edge weights: cosine^power,
    ZLaP's sharpening), from Y0 = the balanced zero-shot probabilities. k and alpha were set on the dev shift."""
    x = F.normalize(embeddings.float(), dim=-1)
    similarity = x @ x.T
    similarity.fill_diagonal_(float("-inf"))  # no self-loops
    nearest, index = similarity.topk(min(k, len(x) - 1), dim=1)
    graph = torch.zeros_like(similarity).scatter_(1, index, nearest.clamp(min=0) ** power)
    graph = graph + graph.T
    scale = graph.sum(dim=1).clamp(min=1e-12).rsqrt()
    graph = scale[:, None] * graph * scale[None, :]
    seeds = sinkhorn_balance(probs)
    labels = seeds
    for _ in range(iterations):
        labels = alpha * graph @ labels + (1 - alpha) * seeds
    return sinkhorn_balance(labels / labels.sum(dim=1, keepdim=True))


def distribution_normalization(
    classifier: ImageClassifier, embeddings: torch.Tensor, coefficient: float = 0.25
) -> torch.Tensor:
    """DN (Zhou et al., NeurIPS 2023): subtract `coefficient` x the bucket's mean (unnormalised) image embedding
    before the cosine with the class embeddings (0.25: the reference code's value). It assumes no class marginal:
    the per-class offset it amounts to, -coefficient x the mean image's cosine with the class, grows with how
    many of the bucket's images lie near that class, by skew or by shift alike."""
    centred = embeddings.float() - coefficient * embeddings.float().mean(dim=0)
    return classifier.logits(centred).softmax(dim=-1)


@torch.inference_mode()
def image_embeddings(classifier: ImageClassifier, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, D) image-tower embeddings of preprocessed pixels, the space the head's cosine is taken in."""
    classifier.eval()
    return torch.cat([classifier.visual(chunk) for chunk in pixels.split(batch_size)]).float()


def tent(
    classifier: ImageClassifier, pixels: torch.Tensor, *, lr: float = 1e-3, batch_size: int = 64,
    epochs: int = 1, seed: int = 0,
) -> torch.Tensor:
    """Tune LayerNorm weights and biases to minimise prediction entropy (minus batch-marginal entropy)."""
    model = copy.deepcopy(classifier).train()
    norms = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in norms:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(norms, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(pixels), generator=generator).split(batch_size):
            probs = model(pixels[batch]).softmax(dim=-1)
            entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=-1).mean()
            marginal = probs.mean(dim=0)
            diversity = -(marginal * marginal.clamp(min=1e-12).log()).sum()
            loss = entropy - diversity
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(chunk).softmax(dim=-1) for chunk in pixels.split(256)])
