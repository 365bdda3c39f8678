"""Whole runs on a tiny random-weight CLIP over real DTD photographs: CLI, resume, edge cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from must_engine import AdaptCancelled, Predictor, adapt, resolve_job_config
from must_engine.artifact import WEIGHTS_FILE, read_metadata
from must_engine.cli import main
from must_engine.train import Progress

CLASSES = ["banded", "blotchy", "braided"]
FAST = {"epochs": 2, "batch_size": 8, "num_workers": 0, "log_every": 1, "checkpoint_every": 2}
MUST = Path(sys.executable).with_name("must")


def test_cli_adapt_classify_and_eval(tiny_base_model: str, dtd_subset: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    result = subprocess.run(
        [str(MUST), "adapt", "--images", str(dtd_subset), "--classes", ",".join(CLASSES),
         "--base-model", tiny_base_model, "--epochs", "1", "--set", "batch_size=8", "--set", "num_workers=0",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "adapted model written" in result.stdout
    assert "3/3" in result.stderr  # the progress bar reached the last step
    metadata = read_metadata(out)
    assert metadata["class_names"] == CLASSES and metadata["config"]["epochs"] == 1
    assert {"loss_st", "loss_mim", "loss_align", "above_tau", "agreement"} <= set(metadata["metrics"])
    weights = load_file(str(out / WEIGHTS_FILE))
    assert "head" in weights and not any(k.startswith(("token_embedding", "transformer.")) for k in weights)
    assert not out.with_name("model.work").exists(), "the checkpoint is cleared after success"

    image = next((dtd_subset / "banded").iterdir())
    assert main(["classify", "--model", str(out), str(image), "--top-k", "2", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing[0]["filename"] == str(image)
    scores = [p["score"] for p in listing[0]["predictions"]]
    assert len(scores) == 2 and scores[0] >= scores[1]
    assert {p["label"] for p in listing[0]["predictions"]} <= set(CLASSES)

    assert main(["eval", "--model", str(out), "--data", str(dtd_subset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 24 and 0.0 <= report["top1"] <= 1.0 and 0.0 <= report["mean_per_class"] <= 1.0

    assert main(["eval", "--model", tiny_base_model, "--data", str(dtd_subset), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 24


def test_cli_reports_bad_input_with_exit_code_2(tiny_base_model: str, dtd_subset: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = ["adapt", "--images", str(dtd_subset), "--classes", "a,b", "--out", str(tmp_path / "m")]
    assert main([*args, "--base-model", "no-such-model"]) == 2
    assert "unknown_base_model" in capsys.readouterr().err
    assert main([*args, "--base-model", tiny_base_model, "--set", "tau=7"]) == 2
    assert "tau" in capsys.readouterr().err
    assert main([*args, "--base-model", tiny_base_model, "--classes", "a,A "]) == 2
    capsys.readouterr()
    assert main([*args, "--base-model", tiny_base_model, "--set", 'class_prior={"a": 3, "c": 1}']) == 2
    err = capsys.readouterr().err
    assert "invalid_class_prior" in err and "'c', which is not one of the class names" in err
    assert not (tmp_path / "m").exists()


def _run(tiny_base_model: str, images: Path, out: Path, work: Path, stop_at: int | None = None,
         events: list[Progress] | None = None, **overrides: object):
    config = resolve_job_config("auto", {**FAST, **overrides}, num_images=24, num_classes=3,
                                base_model=tiny_base_model)
    seen = events if events is not None else []
    return adapt(images, CLASSES, out, base_model=tiny_base_model, config=config, work_dir=work,
                 on_progress=seen.append,
                 should_stop=(lambda: bool(seen) and seen[-1].step >= stop_at) if stop_at else None)


def test_resume_continues_teacher_optimizer_and_step(tiny_base_model: str, dtd_subset: Path, tmp_path: Path) -> None:
    straight = _run(tiny_base_model, dtd_subset, tmp_path / "a", tmp_path / "work-a")

    with pytest.raises(AdaptCancelled):
        _run(tiny_base_model, dtd_subset, tmp_path / "b", tmp_path / "work-b", stop_at=3)
    interrupted = torch.load(tmp_path / "work-b" / "checkpoint.pt", weights_only=False)
    assert interrupted["step"] == 2
    assert interrupted["optimizer"]["state"], "optimizer moments are saved"
    assert not torch.equal(interrupted["teacher"]["classifier.head"], interrupted["student"]["classifier.head"])

    events: list[Progress] = []
    resumed = _run(tiny_base_model, dtd_subset, tmp_path / "b", tmp_path / "work-b", events=events)
    assert resumed.resumed_from_step == 2 and resumed.steps == straight.steps == 6
    assert events[0].message == "resumed from checkpoint at step 2"
    assert [e.step for e in events if e.metrics and not e.message] == [3, 4, 5, 6]
    a, b = load_file(str(tmp_path / "a" / WEIGHTS_FILE)), load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), f"{name} differs after resume"


def test_no_confident_pseudo_label_trains_without_nan(tiny_base_model: str, dtd_subset: Path, tmp_path: Path) -> None:
    events: list[Progress] = []
    result = _run(tiny_base_model, dtd_subset, tmp_path / "m", tmp_path / "w", events=events, tau=1.0, epochs=1)
    losses = [e.metrics for e in events if e.metrics]
    assert all(m["loss_st"] == 0.0 and m["above_tau"] == 0.0 for m in losses)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in losses)
    assert all(e.pseudo_labels is None for e in events), "no confident pseudo-label, no histogram"
    assert result.steps == 3


def test_self_training_only_and_student_export(tiny_base_model: str, dtd_subset: Path, tmp_path: Path) -> None:
    events: list[Progress] = []
    _run(tiny_base_model, dtd_subset, tmp_path / "m", None, events=events, mim=False, export="student", epochs=1)
    assert all("loss_mim" not in e.metrics for e in events)
    assert read_metadata(tmp_path / "m")["exported"] == "student"


def test_each_window_reports_its_pseudo_label_histogram(tiny_base_model: str, dtd_subset: Path, tmp_path: Path) -> None:
    events: list[Progress] = []
    _run(tiny_base_model, dtd_subset, tmp_path / "m", None, events=events, tau=0.0, epochs=1)
    windows = [e for e in events if e.metrics and not e.message]
    assert len(windows) == 3
    for e in windows:  # with tau 0 every pseudo-label is confident: each class's share of them
        assert e.metrics["above_tau"] == 1.0 and e.pseudo_labels is not None
        assert len(e.pseudo_labels) == len(CLASSES) and abs(sum(e.pseudo_labels) - 1) < 1e-5
        assert all(share * 8 == pytest.approx(round(share * 8)) for share in e.pseudo_labels), "counts of a batch of 8"


def test_zero_shot_predictor_matches_the_adapted_model_before_training(tiny_base_model: str, dtd_subset: Path,
                                                                       tmp_path: Path) -> None:
    """An artifact trained with lr 0 and EMA decay 1, and not balanced (neither before
    training nor at export), is exactly the zero-shot classifier."""
    _run(tiny_base_model, dtd_subset, tmp_path / "m", None, epochs=1, base_lr=0.0, min_lr=0.0,
         ema_init=1.0, ema_final=1.0, balance_init=False, balance_classes=False)
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted((dtd_subset / "braided").iterdir())[:4]]
    adapted = Predictor.load(tmp_path / "m").classify(images, top_k=3)
    zero_shot = Predictor.zero_shot(tiny_base_model, CLASSES).classify(images, top_k=3)
    for left, right in zip(adapted, zero_shot, strict=True):
        assert [label for label, _ in left] == [label for label, _ in right]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(left, right, strict=True))


def test_classifier_keeps_the_base_models_temperature(tiny_base_model: str) -> None:
    """CLIP's learned logit scale is 100 (the paper's constant); a model that learned another keeps its own."""
    from must_engine.base_models import load_base_model
    from must_engine.zeroshot import zero_shot_classifier

    base = load_base_model(tiny_base_model)
    expected = float(base.model.logit_scale.exp())
    assert 1.0 < expected < 100.0
    assert float(zero_shot_classifier(base, CLASSES).logit_scale) == pytest.approx(expected)
    with torch.no_grad():
        base.model.logit_scale.fill_(10.0)  # exp(10) > 100: clamped like open_clip clamps it in training
    assert float(zero_shot_classifier(base, CLASSES).logit_scale) == 100.0


@pytest.mark.parametrize(("overrides", "moving"), [
    ({"micro_batch_size": 2, "batch_size": 8}, True),  # 2 images cannot estimate the mean over 3 classes
    ({"micro_batch_size": 4, "batch_size": 8}, False),
    ({"fair_mode": "moving_average"}, True),
])
def test_fairness_mode_comes_from_the_config_not_the_device(tiny_base_model: str, overrides: dict,
                                                            moving: bool) -> None:
    from must_engine.base_models import load_base_model
    from must_engine.config import MustConfig
    from must_engine.models import MustModel
    from must_engine.train import MustStep
    from must_engine.zeroshot import zero_shot_classifier

    student = MustModel(zero_shot_classifier(load_base_model(tiny_base_model), CLASSES))
    step = MustStep(student, MustConfig(**overrides), total_steps=1, device=torch.device("cpu"), autocast_dtype=None)
    assert step.fair_moving is moving
