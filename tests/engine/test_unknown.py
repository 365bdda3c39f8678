"""Images of no known class: the scores, the label-free threshold, the UEO weights against hand-computed
cases, and the threshold's trip through a real adaptation into the artifact and the predictor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from must_engine import Predictor, adapt, resolve_job_config
from must_engine.artifact import read_metadata
from must_engine.cli import main
from must_engine.images import open_image
from must_engine.losses import self_training_loss
from must_engine.unknown import (
    DEFAULT_MIN_SCORE,
    SCORE_HISTOGRAM_BINS,
    UnknownWeighting,
    fit_threshold,
    ood_score,
    score_histogram,
    threshold_from_min_score,
    weighted_mean_prediction,
)

CLASSES = ["banded", "blotchy", "braided"]
FAST = {"epochs": 1, "batch_size": 8, "num_workers": 0, "log_every": 1, "checkpoint_every": 100}


def test_msp_score_is_one_minus_the_top_probability_and_highest_for_a_flat_prediction() -> None:
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    scores = ood_score(logits, torch.zeros(3), 100.0, "msp")
    expected = 1 - logits.softmax(dim=-1).max(dim=-1).values
    assert torch.allclose(scores, expected)
    assert scores.argmax() == 1 and math.isclose(float(scores[1]), 2 / 3, rel_tol=1e-6)


def test_max_cosine_reads_the_cosine_under_the_class_bias() -> None:
    bias = torch.tensor([1.0, -1.0])
    cosines = torch.tensor([[0.3, 0.1], [0.05, 0.2]])
    scores = ood_score(10.0 * cosines + bias, bias, 10.0, "max_cosine")
    assert torch.allclose(scores, torch.tensor([0.7, 0.8]))


def test_threshold_splits_a_two_population_bucket_between_them() -> None:
    generator = torch.Generator().manual_seed(0)
    known = 0.3 + 0.05 * torch.randn(800, generator=generator)
    unknown = 0.8 + 0.05 * torch.randn(200, generator=generator)
    fitted = fit_threshold(torch.cat([known, unknown]))
    assert fitted["method"] == "mixture"
    assert 0.45 < float(fitted["threshold"]) < 0.65
    assert math.isclose(float(fitted["bucket_share"]), 0.2, abs_tol=0.01)


def test_a_bucket_of_one_population_flags_about_one_percent() -> None:
    scores = 0.4 + 0.1 * torch.randn(2000, generator=torch.Generator().manual_seed(1))
    fitted = fit_threshold(scores)
    assert fitted["method"] == "clean_quantile"
    assert math.isclose(float(fitted["bucket_share"]), 0.01, abs_tol=0.002)


def test_score_histogram_has_equal_bins_of_the_unit_interval_with_both_ends_inside() -> None:
    counts = score_histogram(torch.tensor([0.0, 0.01, 0.049, 0.05, 0.5, 0.999, 1.0, 1.2, -0.1]))
    assert len(counts) == SCORE_HISTOGRAM_BINS == 20
    assert counts[0] == 4 and counts[1] == 1 and counts[10] == 1 and counts[19] == 3  # out-of-range: clamped
    assert int(counts.sum()) == 9


def test_ueo_weights_scale_self_training_by_the_teacher_confidence(tiny_base_model: str) -> None:
    from must_engine.base_models import load_base_model
    from must_engine.zeroshot import zero_shot_classifier

    classifier = zero_shot_classifier(load_base_model(tiny_base_model), CLASSES, "default")
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    teacher = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45]])
    weak = torch.randn(3, 3, 32, 32)
    weights = UnknownWeighting(classifier, "ueo")(weak, teacher)
    assert weights is not None and torch.allclose(weights, torch.tensor([0.9, 0.7, 0.55]))
    assert UnknownWeighting(classifier, "off")(weak, teacher) is None
    # UEO's own choice: the frozen zero-shot model's confidence, whatever the classifier becomes after
    anchored = UnknownWeighting(classifier, "ueo_zero_shot")
    expected = classifier(weak).softmax(dim=-1).max(dim=-1).values
    with torch.no_grad():
        classifier.head.mul_(-1.0)
    assert torch.allclose(anchored(weak, teacher), expected.detach())
    restored = UnknownWeighting(classifier, "ueo_zero_shot")  # as on resume: built around other weights
    restored.load_state_dict(anchored.state_dict())
    assert torch.allclose(restored(weak, teacher), expected.detach())
    loss, keep = self_training_loss(logits, teacher, tau=0.6, weights=weights)
    assert keep.tolist() == [True, True, False]
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-1.0))]
    assert math.isclose(loss.item(), (0.9 * ce[0] + 0.7 * ce[1]) / (0.9 + 0.7), rel_tol=1e-6)


def test_fairness_average_weights_unconfident_images_by_the_inverse_confidence() -> None:
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    weights = torch.tensor([0.8, 0.4])
    expected = (probs[0] / 0.8 + probs[1] / 0.4) / (1 / 0.8 + 1 / 0.4)
    assert torch.allclose(weighted_mean_prediction(probs, weights), expected)
    assert torch.allclose(weighted_mean_prediction(probs, None), probs.mean(dim=0))


@pytest.mark.parametrize("weighting", ["ueo", "off"])
def test_the_fitted_threshold_travels_with_the_artifact_and_decides_unknown(
    weighting: str, tiny_base_model: str, dtd_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = resolve_job_config("auto", {**FAST, "unknown_weighting": weighting}, num_images=24,
                                num_classes=3, base_model=tiny_base_model)
    adapt(dtd_subset, CLASSES, tmp_path / "m", base_model=tiny_base_model, config=config)
    fitted = read_metadata(tmp_path / "m")["unknown"]
    assert fitted["score"] == "entropy" and fitted["method"] in ("mixture", "clean_quantile")
    assert 0.0 <= fitted["threshold"] <= 1.0

    predictor = Predictor.load(tmp_path / "m")
    assert predictor.unknown_threshold == fitted["threshold"]
    # decoded as the bucket is at export and by the bucket's predictions (JPEG draft at twice the input size)
    images = [open_image(path, draft_size=2 * predictor.size) for path in sorted(dtd_subset.rglob("*.jpg"))]
    results = predictor.classify_images(images, top_k=3)
    for result in results:
        probs = [score for _, score in result.predictions]  # all 3 classes
        entropy = -sum(p * math.log(p) for p in probs) / math.log(3)
        assert math.isclose(result.ood_score, entropy, abs_tol=1e-5)
        assert result.unknown == (result.ood_score > fitted["threshold"])
    # the share of the bucket flagged at adaptation time is what serving flags on the same images
    assert math.isclose(sum(r.unknown for r in results) / len(results), fitted["bucket_share"], abs_tol=1e-6)

    # min_score overrides the fitted threshold per call: the least certainty (1 - ood_score) of a known image
    assert all(r.unknown for r in predictor.classify_images(images, min_score=1.0))
    assert not any(r.unknown for r in predictor.classify_images(images, min_score=0.0))
    middle = sorted(1 - r.ood_score for r in results)[len(results) // 2]
    overridden = predictor.classify_images(images, min_score=middle)
    assert [r.unknown for r in overridden] == [1 - r.ood_score < middle for r in results]
    assert any(r.unknown for r in overridden) and not all(r.unknown for r in overridden)

    image = str(sorted(dtd_subset.rglob("*.jpg"))[0])
    assert main(["classify", "--model", str(tmp_path / "m"), image, "--json", "--min-score", "1"]) == 0
    listing = json.loads(capsys.readouterr().out)
    (expected,) = predictor.classify_images([open_image(Path(image))])  # the CLI decodes at full size
    assert listing[0]["unknown"] is True and math.isclose(listing[0]["ood_score"], expected.ood_score, rel_tol=1e-5)
    assert main(["classify", "--model", str(tmp_path / "m"), image, "--min-score", "0"]) == 0
    assert f"{image}: known (ood_score" in capsys.readouterr().out


def test_zero_shot_without_a_bucket_uses_the_default_min_score(tiny_base_model: str, dtd_subset: Path) -> None:
    predictor = Predictor.zero_shot(tiny_base_model, CLASSES)
    assert predictor.unknown_threshold == threshold_from_min_score(DEFAULT_MIN_SCORE)
    results = predictor.classify_images([open_image(p) for p in sorted(dtd_subset.rglob("*.jpg"))[:4]])
    assert all(r.unknown == (1 - r.ood_score < DEFAULT_MIN_SCORE) for r in results)


def test_the_weighting_is_opt_in_and_the_paper_presets_keep_it_off() -> None:
    assert resolve_job_config("auto", {}, num_images=100, num_classes=3).unknown_weighting == "off"
    assert resolve_job_config("dtd", {}, num_images=100, num_classes=3).unknown_weighting == "off"
    assert resolve_job_config("auto", {"unknown_weighting": "ueo"}, num_images=100,
                              num_classes=3).unknown_weighting == "ueo"
