"""Bucket labelling and label-free evidence: estimators on known probabilities, `must adapt --predictions`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from must_engine import Predictor, open_image
from must_engine.artifact import read_metadata
from must_engine.audit import audit, unknown_folders
from must_engine.balance import sinkhorn_class_bias
from must_engine.bucket import RowsFile
from must_engine.cli import SKEWED_DISAGREES, main
from must_engine.estimate import ESTIMATORS, BucketEvidence
from must_engine.evaluate import evaluate
from must_engine.measured_errors import SHIPPED, SKEWED_MEASURED_ERROR
from must_engine.unknown import THRESHOLD_METHODS

CLASSES = ["banded", "blotchy", "braided"]


def test_estimators_and_report_on_known_probabilities() -> None:
    torch.manual_seed(0)
    adapted = torch.softmax(torch.randn(50, 3) * 3, dim=-1)
    zero_shot = torch.softmax(torch.randn(50, 3) * 3, dim=-1)
    evidence = BucketEvidence(CLASSES)
    for start in range(0, 50, 16):  # batches of uneven size must give the numbers of the whole matrix
        evidence.add(adapted[start : start + 16], zero_shot[start : start + 16])

    top_a, top_z = adapted.argmax(1), zero_shot.argmax(1)
    ac = evidence.estimate("average_confidence")
    assert ac["adapted"] == pytest.approx(float(adapted.max(1).values.mean()), abs=1e-6)
    cross = evidence.estimate("cross_confidence")
    assert cross["zero_shot"] == pytest.approx(float(adapted[torch.arange(50), top_z].mean()), abs=1e-6)
    nuclear = evidence.estimate("nuclear_norm")
    expected = float(torch.linalg.svdvals(zero_shot.double()).sum() / (50 * 3) ** 0.5)
    assert nuclear["zero_shot"] == pytest.approx(expected, abs=1e-9)
    assert all(0 <= value <= 1 for name in ESTIMATORS for value in evidence.estimate(name).values())

    report = evidence.report(balanced_export=False, training_metrics={"agreement": 0.75})
    assert report["num_images"] == 50 and report["teacher_student_agreement"] == 0.75
    assert report["changed_from_zero_shot"] == pytest.approx(float((top_a != top_z).float().mean()))
    assert report["class_histogram"]["zero_shot"] == dict(zip(CLASSES, torch.bincount(top_z, minlength=3).tolist(),
                                                              strict=True))
    assert report["beyond_balancing"]["images"] == 50


def test_the_report_estimates_with_the_estimator_measured_on_its_kind_of_export() -> None:
    """A class-balanced export (auto's) and an unbalanced one (the paper's MUST) were measured apart and
    ship different estimators; the report uses the one for its kind and carries that kind's error."""
    assert SHIPPED["balanced"].estimator != SHIPPED["unbalanced"].estimator
    torch.manual_seed(2)
    evidence = BucketEvidence(CLASSES)
    evidence.add(torch.softmax(torch.randn(40, 3) * 3, dim=-1), torch.softmax(torch.randn(40, 3) * 3, dim=-1))
    for balanced_export, kind in ((True, "balanced"), (False, "unbalanced")):
        estimate = evidence.report(balanced_export=balanced_export)["estimated_top1"]
        shipped = SHIPPED[kind]
        assert estimate == {**evidence.estimate(shipped.estimator), "estimator": shipped.estimator,
                            "assumes": "balanced_classes", "measured_error": shipped.measured_error}
        assert estimate["measured_error"]["mae_points"] > 0 and estimate["measured_error"]["held_out"]
    to_prior = evidence.report(balanced_export=True, class_prior=(0.5, 0.3, 0.2))
    shipped = SHIPPED["balanced_to_prior"]
    assert to_prior["estimated_top1"] == {**evidence.estimate(shipped.estimator, (0.5, 0.3, 0.2)),
                                          "estimator": shipped.estimator, "assumes": "class_prior",
                                          "measured_error": shipped.measured_error}
    # the skewed-classes estimate is shown only for the kind it was measured worth reading on
    assert to_prior["estimated_top1_if_skewed"] is None
    for balanced_export, kind in ((True, "balanced"), (False, "unbalanced")):
        skewed = evidence.report(balanced_export=balanced_export)["estimated_top1_if_skewed"]
        assert skewed["measured_error"] == SKEWED_MEASURED_ERROR[kind]


def test_an_export_balanced_to_a_right_prior_is_judged_by_zero_shot_balanced_to_it() -> None:
    """A shift makes zero-shot favour class 0 on a bucket whose frequent class is 2 (10/30/60); the export
    balanced to those shares is right far more often. Zero-shot as it stands, judging that export, scores it
    less than half its accuracy; zero-shot balanced to the same shares, prior_cross_confidence's judge, comes
    within a few points."""
    generator = torch.Generator().manual_seed(4)
    prior = (0.1, 0.3, 0.6)
    truth = torch.cat([torch.full((100,), 0), torch.full((300,), 1), torch.full((600,), 2)])
    logits = 2.0 * torch.nn.functional.one_hot(truth, 3) + torch.randn(1000, 3, generator=generator)
    zero_shot = torch.softmax(logits + torch.tensor([2.0, 0.0, -1.0]), dim=-1)  # the shift's skew
    adapted = torch.softmax(torch.log(zero_shot) + sinkhorn_class_bias(zero_shot, prior), dim=-1)
    accuracy = {name: float((p.argmax(1) == truth).float().mean()) for name, p in
                (("adapted", adapted), ("zero_shot", zero_shot))}
    assert accuracy["adapted"] > accuracy["zero_shot"] + 0.1

    evidence = BucketEvidence(CLASSES)
    evidence.add(adapted, zero_shot)
    plain, judged = evidence.estimate("cross_confidence"), evidence.estimate("prior_cross_confidence", prior)
    assert accuracy["adapted"] - plain["adapted"] > 0.3  # the failure the balanced judge exists for
    assert abs(judged["adapted"] - accuracy["adapted"]) < 0.1
    assert judged["zero_shot"] == plain["zero_shot"]  # zero-shot is still judged by the adapted model


def test_on_a_bucket_skewed_as_zero_shot_predicts_the_skewed_estimate_sees_the_balancings_loss() -> None:
    """A long-tailed bucket (60/30/10) that a calibrated zero-shot head already gets mostly right, and an export
    balanced towards uniform, which moves head images into the tail: it is worse, yet the balanced-classes
    estimate calls it better. The estimate under zero-shot's own class shares orders the two models right."""
    generator = torch.Generator().manual_seed(3)
    truth = torch.cat([torch.full((600,), 0), torch.full((300,), 1), torch.full((100,), 2)])
    logits = 2.0 * torch.nn.functional.one_hot(truth, 3) + torch.randn(1000, 3, generator=generator)
    zero_shot = torch.softmax(logits + torch.tensor([0.6, 0.0, -0.6]), dim=-1)  # the bucket's skew, roughly
    adapted = torch.softmax(logits, dim=-1)
    adapted = torch.softmax(torch.log(adapted) + sinkhorn_class_bias(adapted), dim=-1)  # balanced to uniform
    accuracy = {name: float((p.argmax(1) == truth).float().mean()) for name, p in
                (("adapted", adapted), ("zero_shot", zero_shot))}
    assert accuracy["adapted"] < accuracy["zero_shot"] - 0.03

    evidence = BucketEvidence(CLASSES)
    evidence.add(adapted, zero_shot)
    report = evidence.report(balanced_export=True)
    balanced, skewed = report["estimated_top1"], report["estimated_top1_if_skewed"]
    assert balanced["adapted"] > balanced["zero_shot"]  # the failure this estimate exists for
    assert skewed["adapted"] < skewed["zero_shot"] and skewed["same_order"] is False
    assert abs(skewed["zero_shot"] - accuracy["zero_shot"]) < abs(balanced["zero_shot"] - accuracy["zero_shot"])
    counts = torch.bincount(zero_shot.argmax(1), minlength=3).double()
    assert list(skewed["class_shares"].values()) == pytest.approx(((counts + 1) / 1003).tolist())
    assert skewed["estimator"] == "zero_shot_shares" and skewed["measured_error"] == SKEWED_MEASURED_ERROR["balanced"]


def test_beyond_balancing_separates_what_balancing_alone_changes_from_what_training_did() -> None:
    """A zero-shot head that favours class 0 so much that it calls everything 0: balancing its classes over
    the bucket alone recovers the 20 images of classes 1 and 2. An adapted model that says what balancing says
    changed nothing beyond it; one still equal to zero-shot differs from the balance on those 20 images."""
    truth = torch.arange(30) % 3
    zero_shot = torch.softmax(4 * torch.nn.functional.one_hot(truth, 3) + torch.tensor([5.0, 0.0, 0.0]), dim=-1)
    assert (zero_shot.argmax(1) == 0).all()
    for adapted, differs in ((torch.nn.functional.one_hot(truth, 3).float(), 0.0), (zero_shot, 20 / 30)):
        evidence = BucketEvidence(CLASSES)
        evidence.add(adapted, zero_shot)
        beyond = evidence.report(balanced_export=True)["beyond_balancing"]
        assert beyond == {"target": "uniform", "class_balancing": pytest.approx(20 / 30),
                          "adapted_differs": pytest.approx(differs), "images": 30}


def test_beyond_balancing_balances_to_the_jobs_class_prior() -> None:
    """The same head on a bucket the team says is mostly class 0: balancing to that prior moves no label,
    so an adapted model equal to zero-shot differs from it nowhere (to uniform it would on 20 of 30)."""
    truth = torch.arange(30) % 3
    zero_shot = torch.softmax(4 * torch.nn.functional.one_hot(truth, 3) + torch.tensor([5.0, 0.0, 0.0]), dim=-1)
    evidence = BucketEvidence(CLASSES)
    evidence.add(zero_shot, zero_shot)
    beyond = evidence.report(balanced_export=True, class_prior=(0.8, 0.1, 0.1))["beyond_balancing"]
    assert beyond == {"target": "class_prior", "class_balancing": 0.0, "adapted_differs": 0.0, "images": 30}


def test_dispersity_estimators_at_their_extremes() -> None:
    """Confident, balanced predictions score 1; uniform ones 1/K. A model that is sure of one class for every
    image is at chance for optimal transport (it must pay to spread), though its mean confidence is 1."""
    evidence = BucketEvidence(CLASSES)
    evidence.add(torch.eye(3).repeat(4, 1), torch.full((12, 3), 1 / 3))
    assert evidence.estimate("nuclear_norm") == pytest.approx({"adapted": 1.0, "zero_shot": 1 / 3})
    assert evidence.estimate("optimal_transport") == pytest.approx({"adapted": 1.0, "zero_shot": 1 / 3}, abs=1e-3)
    collapsed = BucketEvidence(CLASSES)
    sure_of_one = torch.tensor([[1.0, 0.0, 0.0]]).repeat(12, 1)
    collapsed.add(sure_of_one, sure_of_one)
    assert collapsed.estimate("average_confidence")["adapted"] == 1.0
    assert collapsed.estimate("optimal_transport")["adapted"] == pytest.approx(1 / 3, abs=1e-3)


def test_optimal_transport_sample_is_a_seeded_reservoir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past OT_SAMPLE images the sample stays that size, holds real rows, and repeats run to run."""
    monkeypatch.setattr("must_engine.estimate.OT_SAMPLE", 20)
    torch.manual_seed(1)
    probabilities = torch.softmax(torch.randn(500, 3), dim=-1)

    def sample() -> torch.Tensor:
        evidence = BucketEvidence(CLASSES)
        for start in range(0, 500, 64):
            evidence.add(probabilities[start : start + 64], probabilities[start : start + 64])
        return evidence.columns().sample_adapted

    first = sample()
    assert first.shape == (20, 3) and torch.equal(first, sample())
    assert all(any(torch.equal(row, original) for original in probabilities) for row in first)
    assert not torch.equal(first, probabilities[:20])  # later images replaced some of the first ones


def test_a_paper_preset_model_is_reported_with_the_unbalanced_kinds_estimator(
        tiny_base_model: str, dtd_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The named presets keep the paper's unbalanced export, so their report must not carry auto's figures."""
    out = tmp_path / "model"
    assert main(["adapt", "--images", str(dtd_subset), "--classes", ",".join(CLASSES), "--base-model",
                 tiny_base_model, "--preset", "dtd", "--epochs", "1", "--set", "batch_size=8", "--set",
                 "num_workers=0", "--device", "cpu", "--quiet", "--out", str(out),
                 "--predictions", str(tmp_path / "labels.csv")]) == 0
    assert not read_metadata(out)["config"]["balance_classes"]
    estimate = read_metadata(out)["report"]["estimated_top1"]
    assert estimate["estimator"] == SHIPPED["unbalanced"].estimator
    assert estimate["measured_error"] == SHIPPED["unbalanced"].measured_error
    assert SHIPPED["unbalanced"].measured_error["summary"] in capsys.readouterr().out


def test_adapt_writes_predictions_and_report(tiny_base_model: str, dtd_subset: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out, table = tmp_path / "model", tmp_path / "labels.csv"
    assert main(["adapt", "--images", str(dtd_subset), "--classes", ",".join(CLASSES), "--base-model",
                 tiny_base_model, "--epochs", "1", "--set", "batch_size=8", "--set", "num_workers=0",
                 "--device", "cpu", "--quiet", "--out", str(out), "--predictions", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "24 predictions written" in printed and "estimated top-1 (" in printed
    assert "of the images look like no known class (ood_score above" in printed

    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    names = sorted(p.relative_to(dtd_subset).as_posix() for p in dtd_subset.rglob("*.jpg"))
    assert [row["image"] for row in rows] == names  # every image, by name, labels never read
    assert set(rows[0]) == {"image", "label", "score", "zero_shot_label", "zero_shot_score", "changed", "ood_score",
                            "unknown"}

    # The columns are what each model says about that image on its own (decoded as `must eval` does).
    adapted = Predictor.load(out, device="cpu")
    zero_shot = Predictor.zero_shot(tiny_base_model, CLASSES, device="cpu")
    image = open_image(dtd_subset / rows[5]["image"], draft_size=2 * adapted.size)
    assert adapted.classify([image], top_k=1)[0][0][0] == rows[5]["label"]
    (label, score), = zero_shot.classify([image], top_k=1)[0]
    assert (rows[5]["zero_shot_label"], float(rows[5]["zero_shot_score"])) == (label, pytest.approx(score, abs=1e-5))
    assert rows[5]["changed"] == str(rows[5]["label"] != label).lower()
    # and the unknown decision is the served one: the artifact's threshold on its ood_score
    (served,) = adapted.classify_images([image], top_k=1)
    assert (float(rows[5]["ood_score"]), rows[5]["unknown"]) == (pytest.approx(served.ood_score, abs=1e-5),
                                                                 str(served.unknown).lower())

    report = read_metadata(out)["report"]
    assert report["num_images"] == 24
    assert read_metadata(out)["config"]["balance_classes"]  # auto's export: the balanced kind's estimator
    assert report["estimated_top1"]["estimator"] == SHIPPED["balanced"].estimator
    assert report["estimated_top1"]["measured_error"]["summary"] in printed
    skewed = report["estimated_top1_if_skewed"]
    assert (f"adapted {100 * skewed['adapted']:.1f}%, zero-shot {100 * skewed['zero_shot']:.1f}%  "
            f"[{SKEWED_MEASURED_ERROR['balanced']['summary']}]") in printed
    assert sum(skewed["class_shares"].values()) == pytest.approx(1.0)
    estimate = report["estimated_top1"]
    agree = (skewed["adapted"] - skewed["zero_shot"]) * (estimate["adapted"] - estimate["zero_shot"]) > 0
    assert skewed["same_order"] is agree and (SKEWED_DISAGREES in printed) is not agree
    method = read_metadata(out)["unknown"]["method"]
    assert report["unknown"]["how"] == THRESHOLD_METHODS[method] and report["unknown"]["how"] in printed
    beyond = report["beyond_balancing"]
    assert (f"over the bucket alone changes {100 * beyond['class_balancing']:.1f}%; the adapted model differs from "
            f"that balanced assignment on {100 * beyond['adapted_differs']:.1f}%") in printed
    assert sum(report["class_histogram"]["adapted"].values()) == 24
    changed = sum(row["changed"] == "true" for row in rows) / 24
    assert report["changed_from_zero_shot"] == pytest.approx(changed)
    assert report["unknown"] == {"threshold": read_metadata(out)["unknown"]["threshold"],
                                 "share": pytest.approx(sum(row["unknown"] == "true" for row in rows) / 24),
                                 "score": "entropy", "histogram": report["unknown"]["histogram"],
                                 "method": method, "how": THRESHOLD_METHODS[method]}
    # the histogram counts the rows' own scores, bin by bin (20 equal bins of [0, 1])
    expected = [0] * 20
    for row in rows:
        expected[min(int(float(row["ood_score"]) * 20), 19)] += 1
    assert report["unknown"]["histogram"] == expected

    # The audit of the same folder is `must eval` for each model.
    result = audit(out, dtd_subset, device="cpu")
    assert result["adapted"] == evaluate(adapted, dtd_subset).to_dict()
    assert result["zero_shot"] == evaluate(zero_shot, dtd_subset).to_dict()
    assert sum(map(sum, result["adapted"]["confusion"])) == result["n"] == 24
    assert unknown_folders(["Banded", "blotchy ", "zigzag"], CLASSES) == ["zigzag"]


def test_rows_file_jsonl_and_bad_suffix(tmp_path: Path) -> None:
    from must_engine.bucket import BucketRow

    row = BucketRow("a/1.png", [("x", 0.7), ("y", 0.3)], [("y", 0.6), ("x", 0.4)], 0.3, False)
    with RowsFile(tmp_path / "p.jsonl") as sink:
        sink.write([row, row])
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == row.to_json() and json.loads(lines[0])["changed"] is True
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        RowsFile(tmp_path / "p.txt")
