"""Images of no known class: a score per image, a label-free threshold fitted on the bucket, and the
per-image weights that keep such images from steering self-training.

Score. `ood_score` is higher for an image less like any class. Candidates from the literature are all
computed from the served logits (`SCORES`): maximum softmax probability (Hendrycks & Gimpel 2017; the score
UEO, Liang et al. 2023, reports AUROC with), energy (Liu et al. 2020), distance to the nearest class
embedding (1 - max cosine, as MCM, Ming et al. 2022, reads CLIP) and the prediction's entropy divided by
log K, in [0, 1]. `OOD_SCORE` (entropy) had the best AUROC on the tuning kinds of the unknown-image benchmark
in 5 of 6 model/mix pairs (by up to 3 points) and tied msp in the sixth (docs/BENCHMARKS.md, section 9).

Threshold. A bucket's scores are a mixture: most images of the known classes and, maybe, a share of
unknown images that score higher. `fit_threshold` fits a two-component Gaussian mixture to them (EM, no
labels) and takes the point where the high component becomes the likelier one; when the two components do
not separate (Ashman's D below 2), or the split would flag under 1% or over half of the bucket (then it
splits confident from unconfident images of the known classes), the threshold is the bucket's 99th
percentile, so about 1% of a clean bucket is flagged.

Weights. UEO weights each image by its confidence (maximum softmax probability): confident images count
more in entropy minimisation, unconfident ones more in the marginal the fairness term spreads over the
classes, so likely-unknown images are pushed towards "no class" instead of into one. `ueo_weights` gives
that confidence for MUST's self-training (cross-entropy to the pseudo-label x confidence) and fairness
(p_bar averaged with 1 / confidence) terms: `UnknownWeighting` takes it from the EMA teacher on the weak
view (`ueo`) or, as UEO's reference code does, from a frozen copy of the zero-shot model (`ueo_zero_shot`).
On the tiny proxy neither helps much (docs/BENCHMARKS.md, section 9). What does separate unknown images
there is `auto`'s class balancing over the whole bucket: it lowers the offsets of the classes unknown images
crowd, so they end up between classes (section 9.1).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from must_engine.balance import balance_classes, bucket_logits
from must_engine.config import MustConfig
from must_engine.models import ImageClassifier

ScoreFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _msp(logits: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    return 1.0 - logits.float().softmax(dim=-1).max(dim=-1).values


def _energy(logits: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    return -torch.logsumexp(logits.float(), dim=-1)


def _max_cosine(logits: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    cosine = (logits.float() - bias.float()) / scale  # the head's columns are unit text embeddings at init
    return 1.0 - cosine.max(dim=-1).values


def _entropy(logits: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    log_p = logits.float().log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1) / math.log(logits.shape[-1])


SCORES: dict[str, ScoreFn] = {"msp": _msp, "energy": _energy, "max_cosine": _max_cosine, "entropy": _entropy}
OOD_SCORE = "entropy"
# A split that flags more than half the bucket is not believed: the known classes are the bucket's point, and
# such a split is confident vs unconfident images of the known classes (docs/BENCHMARKS.md, section 9).
MAX_UNKNOWN_SHARE = 0.5
MIN_UNKNOWN_SHARE = 0.01
CLEAN_QUANTILE = 0.99
# No bucket to fit on (zero-shot, artifacts from before): unknown only where the prediction is nearly uniform
# (normalised entropy above 0.95), i.e. no class stands out at all.
DEFAULT_MIN_SCORE = 0.05
MIN_SEPARATION = 2.0
# The bucket report's histogram of the served score (normalised entropy, in [0, 1]): equal bins, so a team
# sees whether a second group of images sits above the threshold before it picks a `min_score`.
SCORE_HISTOGRAM_BINS = 20


def ood_score(
    logits: torch.Tensor, class_bias: torch.Tensor, logit_scale: float, kind: str = OOD_SCORE
) -> torch.Tensor:
    """(N, K) served logits -> (N,) scores, higher = less like any class."""
    return SCORES[kind](logits, class_bias, logit_scale)


def is_unknown(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    return scores > threshold


def score_histogram(scores: torch.Tensor) -> torch.Tensor:
    """(N,) scores -> (SCORE_HISTOGRAM_BINS,) counts over equal bins of [0, 1]; a score of 1 is in the last bin."""
    bins = (scores.float().clamp(0.0, 1.0) * SCORE_HISTOGRAM_BINS).long().clamp(max=SCORE_HISTOGRAM_BINS - 1)
    return torch.bincount(bins, minlength=SCORE_HISTOGRAM_BINS)


def threshold_from_min_score(min_score: float) -> float:
    """A request's `min_score` as a threshold on ood_score: an image is unknown when 1 - ood_score (its
    certainty: 1 for one sure class, 0 for a uniform prediction) is below min_score."""
    return 1.0 - min_score


def fit_threshold(scores: torch.Tensor, iterations: int = 200) -> dict[str, float | str]:
    """Label-free threshold over one bucket's scores; also says how it was chosen and what share it flags."""
    x = scores.double().flatten()
    x = x[torch.isfinite(x)]
    if len(x) < 10:
        return {"threshold": float(x.max()) if len(x) else 1.0, "method": "too_few_images", "bucket_share": 0.0}
    mixture = _two_gaussians(x, iterations)
    (_, m_low, s_low), (w_high, m_high, s_high) = mixture
    separation = math.sqrt(2) * abs(m_high - m_low) / math.sqrt(s_low**2 + s_high**2)
    threshold = _crossing(mixture) if separation >= MIN_SEPARATION else None
    method = "mixture"
    if threshold is not None:
        share = float((x > threshold).double().mean())
        if not MIN_UNKNOWN_SHARE <= share <= MAX_UNKNOWN_SHARE:
            threshold = None
    if threshold is None:
        threshold, method = float(torch.quantile(x, CLEAN_QUANTILE)), "clean_quantile"
    return {
        "threshold": float(threshold), "method": method, "separation": float(separation),
        "bucket_share": float((x > threshold).double().mean()),
        "mixture_high_weight": float(w_high), "mixture_low_mean": float(m_low), "mixture_high_mean": float(m_high),
    }


# What each `method` of fit_threshold means, as one sentence for people reading a report: the bucket report
# carries it as `how`, which the CLI prints and the dashboard shows under the score histogram.
THRESHOLD_METHODS = {
    "mixture": "The bucket's scores form two groups; the threshold is where the upper one becomes the likelier.",
    "clean_quantile": "The bucket's scores form no second group, so it looks clean and the threshold flags its "
                      "top 1%.",
    "too_few_images": "Too few images to fit on: the threshold is the bucket's highest score.",
    "default": "The model had no bucket to fit on: the threshold is the default.",
}


def _two_gaussians(x: torch.Tensor, iterations: int) -> list[tuple[float, float, float]]:
    """EM for a 1-D mixture of two Gaussians, started from the lower and upper quartiles; sorted by mean."""
    means = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype))
    spread = max(float(x.std()), 1e-6)
    sigmas = torch.full((2,), spread / 2, dtype=x.dtype)
    weights = torch.full((2,), 0.5, dtype=x.dtype)
    floor = spread * 1e-3
    for _ in range(iterations):
        log_density = (-0.5 * ((x[:, None] - means) / sigmas) ** 2 - sigmas.log() + weights.log())
        resp = (log_density - log_density.logsumexp(dim=1, keepdim=True)).exp()
        mass = resp.sum(dim=0).clamp(min=1e-9)
        weights = mass / len(x)
        means = (resp * x[:, None]).sum(dim=0) / mass
        sigmas = ((resp * (x[:, None] - means) ** 2).sum(dim=0) / mass).sqrt().clamp(min=floor)
    order = means.argsort().tolist()
    return [(float(weights[i]), float(means[i]), float(sigmas[i])) for i in order]


def _crossing(mixture: list[tuple[float, float, float]]) -> float | None:
    """Between the two means, the score where the high component's weighted density overtakes the low one's."""
    (w0, m0, s0), (w1, m1, s1) = mixture
    grid = torch.linspace(m0, m1, 2001, dtype=torch.float64)

    def log_density(w: float, m: float, s: float) -> torch.Tensor:
        return math.log(w) - math.log(s) - 0.5 * ((grid - m) / s) ** 2

    above = (log_density(w1, m1, s1) > log_density(w0, m0, s0)).nonzero()
    return float(grid[above[0, 0]]) if len(above) else None


def ueo_weights(teacher_probs: torch.Tensor) -> torch.Tensor:
    """(B, K) teacher probabilities -> (B,) detached confidence weights (UEO): low for likely-unknown images."""
    return teacher_probs.detach().max(dim=-1).values.clamp(min=1e-6)


def weighted_mean_prediction(probs: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The fairness term's p_bar; with UEO's weights, averaged with 1 / confidence: unconfident images are
    spread over the classes (so they end up belonging to none) while confident ones are left to self-training."""
    if weights is None:
        return probs.mean(dim=0)
    inverse = 1.0 / weights
    return (probs * inverse[:, None]).sum(dim=0) / inverse.sum()


class UnknownWeighting:
    """Per-image weights for self-training and fairness under `config.unknown_weighting`.

    "ueo": the EMA teacher's confidence; "ueo_zero_shot": the confidence of a frozen copy of the classifier
    as training started (the zero-shot model, as UEO's reference code weights), kept in checkpoints; "off":
    None (the paper's MUST).
    """

    def __init__(self, classifier: ImageClassifier, mode: str) -> None:
        self.mode = mode
        self.anchor = copy.deepcopy(classifier).eval().requires_grad_(False) if mode == "ueo_zero_shot" else None

    @torch.no_grad()
    def __call__(self, weak: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor | None:
        if self.anchor is not None:
            return ueo_weights(self.anchor(weak).float().softmax(dim=-1))
        return ueo_weights(teacher_probs) if self.mode == "ueo" else None

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.anchor.state_dict() if self.anchor is not None else None

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.anchor is not None and state is not None:
            self.anchor.load_state_dict(state)


def finish_head(
    classifier: ImageClassifier, paths: Sequence[Path], preprocess: dict[str, Any], device: torch.device,
    config: MustConfig,
) -> tuple[dict[str, float], dict[str, Any]]:
    """After training: classify the bucket once, balance the classes if the config says so (over the images
    not flagged unknown when `unknown_weighting` is on), and fit the unknown threshold on the served logits.

    Returns the run's label-free metrics and the artifact's `unknown` metadata (score name + threshold).
    """
    logits = bucket_logits(classifier, paths, preprocess, device) - classifier.class_bias.cpu()
    scale = float(classifier.logit_scale)
    metrics: dict[str, float] = {}
    if config.balance_classes:
        known = None
        if config.unknown_weighting != "off":
            raw = ood_score(logits, torch.zeros(classifier.num_classes), scale)
            known = ~is_unknown(raw, float(fit_threshold(raw)["threshold"]))
        metrics.update(balance_classes(classifier, logits, known, prior=config.class_prior))
    bias = classifier.class_bias.detach().cpu()
    fitted = fit_threshold(ood_score(logits + bias, bias, scale))
    metrics["unknown_bucket_share"] = float(fitted["bucket_share"])
    return metrics, {"score": OOD_SCORE, **fitted}
