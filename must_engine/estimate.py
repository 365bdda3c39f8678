"""Label-free evidence on a bucket: what changed from zero-shot, and estimated top-1 for both models.

Everything here reads only the two models' probabilities on the bucket, never a label. `BucketEvidence`
keeps a few numbers per image (not the K-wide probability rows), so a million-image bucket fits easily.

Estimators of top-1 accuracy (each gives one for the adapted and one for the zero-shot model):

- ``average_confidence`` (AC, Hendrycks & Gimpel 2017): the mean top-1 probability of the model itself.
- ``cross_confidence``: each model's predictions scored by the other model's probabilities, mean of
  p_other(argmax p_self). A model's own confidence is inflated by self-training; the other model's is not
  inflated by *this* model's training.
- ``ensemble_confidence``: the same with the average of both models' probabilities as the judge.
- ``agreement_ac``: AC rescaled so that each model's confidence matches the observed agreement between
  the two models (a label-free analogue of ATC, Garg et al. 2022, with agreement in place of labels).
- ``nuclear_norm`` (Deng et al., ICML 2023, "Confidence and Dispersity Speak"): the nuclear norm of the
  N x K prediction matrix over sqrt(N * min(N, K)); high when predictions are both confident and spread
  over the classes. Computed from the K x K matrix P^T P, accumulated batch by batch. Its dispersity
  part assumes the bucket's classes are not far from balanced.

- ``optimal_transport`` (COT: Lu et al., NeurIPS 2023, "Characterizing Out-of-Distribution Error via
  Optimal Transport"): one minus the cost of moving the predicted probability vectors onto one-hot labels
  with a uniform class marginal, cost(p, e_k) = 1 - p_k; solved by entropic Sinkhorn on a seeded sample of
  at most `OT_SAMPLE` images. A confident model whose predictions pile onto a few classes pays to spread
  them, so it is not scored as confident. It assumes the bucket's classes are roughly balanced; on an
  imbalanced bucket it underestimates.

- ``prior_cross_confidence``: ``cross_confidence`` with the adapted model judged by zero-shot balanced to the
  class shares the export was balanced to (a job's ``class_prior``).
- ``zero_shot_shares``: both models judged by the adapted model moved to the class shares of zero-shot's
  labels; the estimate under the hypothesis that the bucket divides as zero-shot says (section 5.2).

The first four were chosen before anything was measured; ``nuclear_norm`` and then ``optimal_transport``
were added after the benchmark showed that mean confidence hardly moves with accuracy on this proxy.

`benchmarks/estimator.py` measures them all against the truth on the proxy benchmark's shifted targets
(docs/BENCHMARKS.md, section 5). Which one is best depends on the kind of model: one exported with its classes
balanced over the bucket (`balance_classes`, what `auto` ships) is not over-confident the way the paper's MUST
is, and is the better judge of zero-shot. So `SHIPPED` holds one estimator per kind of export, each the lowest
error for that kind, with its measured error, which travels with every estimate: a report never shows a bare
number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from must_engine.balance import balanced_log_probs
from must_engine.measured_errors import SHIPPED, SKEWED_MEASURED_ERROR, export_kind


@dataclass(frozen=True)
class _Columns:
    """Per-image numbers the estimators and the report need (1-D tensors of one length)."""

    top_adapted: torch.Tensor
    top_zero_shot: torch.Tensor
    conf_adapted: torch.Tensor
    conf_zero_shot: torch.Tensor
    adapted_on_zero_shot: torch.Tensor  # p_adapted(argmax p_zero_shot)
    zero_shot_on_adapted: torch.Tensor  # p_zero_shot(argmax p_adapted)
    gram_adapted: torch.Tensor  # P^T P over the images, (K, K) float64
    gram_zero_shot: torch.Tensor
    sample_adapted: torch.Tensor  # probability rows of a seeded uniform sample of images, (<= OT_SAMPLE, K)
    sample_zero_shot: torch.Tensor
    prior: tuple[float, ...] = ()  # the class shares the export was balanced to; () = uniform


Estimate = dict[str, float]  # {"adapted": top-1 in 0..1, "zero_shot": top-1 in 0..1}


def average_confidence(c: _Columns) -> Estimate:
    return {"adapted": _mean(c.conf_adapted), "zero_shot": _mean(c.conf_zero_shot)}


def cross_confidence(c: _Columns) -> Estimate:
    return {"adapted": _mean(c.zero_shot_on_adapted), "zero_shot": _mean(c.adapted_on_zero_shot)}


def prior_cross_confidence(c: _Columns) -> Estimate:
    """cross_confidence with the adapted model's judge balanced (Sinkhorn) to the class shares its export was
    balanced to: zero-shot as it stands is skewed by the shift, so it under-scores a model that corrected the
    skew. Shipped for exports balanced to a job's class_prior, where plain cross_confidence called 8 of 11 gains
    losses (docs/BENCHMARKS.md, section 5.2)."""
    judge = balanced_log_probs(c.sample_zero_shot, prior=c.prior).softmax(dim=-1)
    return {"adapted": _judged(judge, c.sample_adapted), "zero_shot": _mean(c.adapted_on_zero_shot)}


def ensemble_confidence(c: _Columns) -> Estimate:
    return {
        "adapted": _mean((c.conf_adapted + c.zero_shot_on_adapted) / 2),
        "zero_shot": _mean((c.conf_zero_shot + c.adapted_on_zero_shot) / 2),
    }


def agreement_ac(c: _Columns) -> Estimate:
    agree = _mean((c.top_adapted == c.top_zero_shot).float())
    ac = average_confidence(c)
    scale = agree / max(1e-9, math.sqrt(ac["adapted"] * ac["zero_shot"]))
    return {model: min(1.0, value * scale) for model, value in ac.items()}


def nuclear_norm(c: _Columns) -> Estimate:
    n = len(c.top_adapted)
    k = c.gram_adapted.shape[0]

    def score(gram: torch.Tensor) -> float:
        singular_values = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
        return float(singular_values.sum() / math.sqrt(n * min(n, k)))

    return {"adapted": score(c.gram_adapted), "zero_shot": score(c.gram_zero_shot)}


def optimal_transport(c: _Columns) -> Estimate:
    return {"adapted": 1 - transport_cost(c.sample_adapted), "zero_shot": 1 - transport_cost(c.sample_zero_shot)}


def transport_cost(probabilities: torch.Tensor, epsilon: float = 0.005, iterations: int = 2000) -> float:
    """Entropic OT cost from the rows (mass 1/N each) to the K one-hot labels (mass 1/K each), cost 1 - p_k.

    Log-domain Sinkhorn; epsilon 0.005 is within 0.1 point of 0.002 on the benchmark's targets.
    """
    p = probabilities.double()
    n, k = p.shape
    cost = 1 - p
    log_a, log_b = -math.log(n), -math.log(k)
    f, g = torch.zeros(n, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for _ in range(iterations):
        f = epsilon * (log_a - torch.logsumexp((g[None, :] - cost) / epsilon, dim=1))
        g_next = epsilon * (log_b - torch.logsumexp((f[:, None] - cost) / epsilon, dim=0))
        converged = float((g_next - g).abs().max()) < 1e-9
        g = g_next
        if converged:
            break
    plan = torch.exp((f[:, None] + g[None, :] - cost) / epsilon)
    return float((plan * cost).sum() / plan.sum())


def zero_shot_shares(c: _Columns) -> Estimate:
    """Both models scored by one judge: the adapted model's probabilities moved (Sinkhorn) to the class shares
    zero-shot predicts over the bucket. Every other estimator here assumes the bucket's classes are balanced
    (or, after a balanced export, that they follow its target): on a long-tailed bucket whose frequent classes
    zero-shot already favours, they call the balancing's loss a gain. This one is the other hypothesis, that
    the bucket divides as zero-shot predicts; the report shows it beside the first so a team sees how much of
    the gain rests on the classes being balanced."""
    shares = zero_shot_class_shares(c.top_zero_shot, c.sample_adapted.shape[1])
    judge = balanced_log_probs(c.sample_adapted, prior=tuple(shares.tolist())).softmax(dim=-1)
    return {"adapted": _judged(judge, c.sample_adapted), "zero_shot": _judged(judge, c.sample_zero_shot)}


def _judged(judge: torch.Tensor, rows: torch.Tensor) -> float:
    """Mean probability the judge's rows give to the label (argmax) of each of `rows`, image by image."""
    return _mean(judge.gather(1, rows.argmax(dim=-1, keepdim=True))[:, 0])


def zero_shot_class_shares(top_zero_shot: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) float64 shares of zero-shot's labels over the bucket, add-one smoothed so no class has none."""
    counts = torch.bincount(top_zero_shot, minlength=num_classes).double()
    return (counts + 1) / (counts.sum() + num_classes)


ESTIMATORS: dict[str, Callable[[_Columns], Estimate]] = {
    "average_confidence": average_confidence,
    "cross_confidence": cross_confidence,
    "prior_cross_confidence": prior_cross_confidence,
    "ensemble_confidence": ensemble_confidence,
    "agreement_ac": agreement_ac,
    "nuclear_norm": nuclear_norm,
    "optimal_transport": optimal_transport,
    "zero_shot_shares": zero_shot_shares,
}
OT_SAMPLE = 10_000


def beyond_balancing(adapted: torch.Tensor, zero_shot: torch.Tensor, prior: Sequence[float] = ()) -> dict[str, Any]:
    """How much of the change from zero-shot a training-free step explains, from both models' rows for the
    same images (the whole bucket up to OT_SAMPLE images, a seeded sample beyond).

    The balanced assignment (zero-shot's probabilities with the Sinkhorn offsets that make its predicted classes
    uniform over these images, must_engine.balance) is what `auto` starts from and what a team gets without any
    training. `class_balancing` is the share of images whose zero-shot label that alone changes; `adapted_differs`
    the share where the adapted model disagrees with it: what training changed that balancing would not. With the
    job's class `prior` the balance is to that marginal (`target`), as the run's own balancing was.
    """
    balanced = balanced_log_probs(zero_shot, prior=prior).argmax(dim=-1)
    return {
        "target": "class_prior" if prior else "uniform",
        "class_balancing": _mean((balanced != zero_shot.argmax(dim=-1)).float()),
        "adapted_differs": _mean((adapted.argmax(dim=-1) != balanced).float()),
        "images": len(zero_shot),
    }


class BucketEvidence:
    """Accumulates both models' probabilities batch by batch, then reports without labels."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        k = len(self.class_names)
        self._parts: list[tuple[torch.Tensor, ...]] = []  # per-image columns of each batch
        self._gram_adapted = torch.zeros(k, k, dtype=torch.float64)  # running sums: K x K, not N x K
        self._gram_zero_shot = torch.zeros(k, k, dtype=torch.float64)
        # A reservoir (Vitter's algorithm R) of both models' rows for the same images, seeded.
        self._sample = torch.empty(0, 2, k)
        self._seen = 0
        self._rng = torch.Generator().manual_seed(0)

    def add(self, adapted: torch.Tensor, zero_shot: torch.Tensor) -> None:
        """(B, K) probabilities of the adapted and the zero-shot model for the same B images."""
        adapted, zero_shot = adapted.float().cpu(), zero_shot.float().cpu()
        conf_a, top_a = adapted.max(dim=-1)
        conf_z, top_z = zero_shot.max(dim=-1)
        self._parts.append((top_a, top_z, conf_a, conf_z, adapted.gather(1, top_z[:, None])[:, 0],
                            zero_shot.gather(1, top_a[:, None])[:, 0]))
        self._gram_adapted += adapted.double().T @ adapted.double()
        self._gram_zero_shot += zero_shot.double().T @ zero_shot.double()
        self._add_to_sample(torch.stack([adapted, zero_shot], dim=1))

    def _add_to_sample(self, rows: torch.Tensor) -> None:
        room = max(0, OT_SAMPLE - len(self._sample))
        self._sample = torch.cat([self._sample, rows[:room]])
        tail = rows[room:]
        end = self._seen + len(rows)
        positions = torch.arange(end - len(tail), end, dtype=torch.float64)  # each row's index in the bucket
        slots = (torch.rand(len(tail), generator=self._rng, dtype=torch.float64) * (positions + 1)).long()
        kept = slots < OT_SAMPLE
        for row, slot in zip(tail[kept], slots[kept].tolist(), strict=True):  # in order: a later row wins a slot
            self._sample[slot] = row
        self._seen += len(rows)

    @property
    def count(self) -> int:
        return sum(len(part[0]) for part in self._parts)

    def columns(self, prior: Sequence[float] = ()) -> _Columns:
        """The per-image columns; `prior`: the class shares the adapted model's export was balanced to."""
        if not self._parts:
            raise ValueError("no images were added")
        if len(self._parts) > 1:
            self._parts = [tuple(torch.cat(column) for column in zip(*self._parts, strict=True))]
        top_a, top_z, conf_a, conf_z, adapted_on_zero_shot, zero_shot_on_adapted = self._parts[0]
        return _Columns(top_a, top_z, conf_a, conf_z, adapted_on_zero_shot, zero_shot_on_adapted,
                        self._gram_adapted, self._gram_zero_shot, self._sample[:, 0], self._sample[:, 1],
                        tuple(prior))

    def estimate(self, estimator: str, prior: Sequence[float] = ()) -> Estimate:
        return ESTIMATORS[estimator](self.columns(prior))

    def report(
        self, *, balanced_export: bool, class_prior: Sequence[float] = (),
        training_metrics: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The label-free report a team reads next to its model (SPEC "Evidence for the team").

        `balanced_export`: the adapted model's classes were balanced over the bucket at export (its config's
        `balance_classes`); with `class_prior`, the marginal that balancing targeted (the config's; uniform when
        empty). The two pick the estimator that was measured on that kind of model (`export_kind`).
        """
        kind = export_kind(balanced_export, class_prior)
        c = self.columns(class_prior if kind == "balanced_to_prior" else ())
        k = len(self.class_names)
        histogram = {
            "adapted": torch.bincount(c.top_adapted, minlength=k).tolist(),
            "zero_shot": torch.bincount(c.top_zero_shot, minlength=k).tolist(),
        }
        metrics = training_metrics or {}
        shipped = SHIPPED[kind]
        estimate = ESTIMATORS[shipped.estimator](c)
        skewed = zero_shot_shares(c) if kind in SKEWED_MEASURED_ERROR else None
        return {
            "num_images": self.count,
            "changed_from_zero_shot": _mean((c.top_adapted != c.top_zero_shot).float()),
            "class_histogram": {
                model: dict(zip(self.class_names, counts, strict=True)) for model, counts in histogram.items()
            },
            "mean_top1_score": {"adapted": _mean(c.conf_adapted), "zero_shot": _mean(c.conf_zero_shot)},
            "beyond_balancing": beyond_balancing(c.sample_adapted, c.sample_zero_shot, class_prior),
            # The student's agreement with the EMA teacher's pseudo-labels over the last logging window.
            "teacher_student_agreement": metrics.get("agreement"),
            "estimated_top1": {
                **estimate,
                "estimator": shipped.estimator,
                # The class shares the estimate takes the bucket to have: those the export was balanced to.
                "assumes": "class_prior" if kind == "balanced_to_prior" else "balanced_classes",
                "measured_error": shipped.measured_error,
            },
            # The other hypothesis: the bucket's classes divide as zero-shot predicts (`class_shares`); only for
            # the kinds of export it was measured on (not one balanced to the job's class prior), else None.
            # `same_order`: whether it ranks the two models as estimated_top1 does; when not, the gain (or loss)
            # rests on the classes being balanced, which the team may know to be false.
            "estimated_top1_if_skewed": {
                **skewed,
                "estimator": "zero_shot_shares",
                "class_shares": dict(zip(self.class_names, zero_shot_class_shares(c.top_zero_shot, k).tolist(),
                                         strict=True)),
                "same_order": _gain(skewed) * _gain(estimate) > 0,
                "measured_error": SKEWED_MEASURED_ERROR[kind],
            } if skewed else None,
        }


def _gain(estimate: Estimate) -> float:
    return estimate["adapted"] - estimate["zero_shot"]


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if len(values) else math.nan
