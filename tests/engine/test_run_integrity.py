"""A run's integrity: fp32 head under bf16, seeded init, finite weights only, whole epochs, strict resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from must_engine import AdaptCancelled, ConfigError, MustConfig, ResumeMismatchError, TrainingDiverged, adapt
from must_engine.artifact import WEIGHTS_FILE
from must_engine.base_models import load_base_model
from must_engine.checkpoint import CHECKPOINT_FILE, load_checkpoint
from must_engine.config import resolve_config
from must_engine.models import ImageClassifier, MustModel
from must_engine.presets import ModelGeometry
from must_engine.train import MustStep, Progress
from must_engine.zeroshot import zero_shot_classifier

CLASSES = ["banded", "blotchy", "braided"]
FAST = {"epochs": 1, "batch_size": 8, "num_workers": 0, "log_every": 1, "checkpoint_every": 1}


def classifier(base_model: str) -> ImageClassifier:
    return zero_shot_classifier(load_base_model(base_model), CLASSES)


def config(**overrides: object) -> MustConfig:
    return resolve_config(overrides={**FAST, **overrides}, num_images=24, num_classes=3,
                          geometry=ModelGeometry(image_size=32, patch_size=8))


def test_head_and_softmax_stay_fp32_under_bf16_autocast(tiny_base_model: str) -> None:
    model = MustModel(classifier(tiny_base_model))
    images = torch.randn(4, 3, 32, 32)
    mask = torch.zeros(4, 4, 4)
    mask[:, :2] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embedding = model.classifier.visual(images)
        logits = model(images)
        masked = model.forward_masked(images, mask)
    assert embedding.dtype == torch.bfloat16  # the tower does run in bf16
    expected = model.classifier.logit_scale * F.normalize(embedding.float(), dim=-1) @ model.classifier.head
    assert logits.dtype == torch.float32 and masked.logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_new_modules_are_initialised_from_the_seed_without_touching_the_global_rng(tiny_base_model: str) -> None:
    base = classifier(tiny_base_model)
    torch.manual_seed(123)
    first = MustModel(copy.deepcopy(base), seed=7)
    after_first = torch.rand(1)
    torch.manual_seed(999)
    second = MustModel(copy.deepcopy(base), seed=7)
    other = MustModel(copy.deepcopy(base), seed=8)
    for name in ("mask_token", "decoder.0.weight", "decoder.0.bias"):
        assert torch.equal(first.state_dict()[name], second.state_dict()[name])
    assert not torch.equal(first.mask_token, other.mask_token)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_first)  # MustModel drew nothing from the global generator


def test_same_seed_same_device_gives_an_identical_masked_artifact(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path
) -> None:
    run = config(epochs=2, mim=True, w_align=0.5)
    weights = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 1000 + ord(name))  # whatever the caller's RNG holds
        result = adapt(dtd_subset, CLASSES, tmp_path / name, base_model=tiny_base_model, config=run, device="cpu")
        weights.append(load_file(str(result.artifact_dir / WEIGHTS_FILE)))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_a_base_model_with_patch_dropout_trains_with_masking(
    patch_dropout_base_model: str, dtd_subset: Path, tmp_path: Path
) -> None:
    result = adapt(dtd_subset, CLASSES, tmp_path / "model", base_model=patch_dropout_base_model,
                   config=config(mim=True), device="cpu")
    assert result.steps == 3 and "loss_mim" in result.metrics


def test_non_finite_loss_stops_before_the_optimizer_step(tiny_base_model: str) -> None:
    student = MustModel(classifier(tiny_base_model))
    step = MustStep(student, config(mim=True), total_steps=10, device=torch.device("cpu"), autocast_dtype=None)
    before = copy.deepcopy(student.state_dict())
    teacher_before = copy.deepcopy(step.teacher.module.state_dict())
    weak = torch.randn(8, 3, 32, 32)
    strong = weak.clone()
    strong[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="optimizer step 1"):
        step(0, iter([(weak, strong, torch.zeros(8, 4, 4))]), accumulation=1)
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in step.teacher.module.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert not step.optimizer.state  # AdamW never stepped


def test_a_diverging_run_keeps_its_last_finite_checkpoint_and_writes_no_artifact(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import must_engine.train as train

    calls = {"n": 0}
    real = train.fairness_loss

    def diverge_on_second_step(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        loss, running = real(*args, **kwargs)  # type: ignore[arg-type]
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] == 2 else loss), running

    monkeypatch.setattr(train, "fairness_loss", diverge_on_second_step)
    work = tmp_path / "work"
    with pytest.raises(TrainingDiverged):
        adapt(dtd_subset, CLASSES, tmp_path / "model", base_model=tiny_base_model, config=config(mim=False),
              device="cpu", work_dir=work)
    checkpoint = load_checkpoint(work)
    assert checkpoint is not None and checkpoint["step"] == 1
    assert all(torch.isfinite(value).all() for value in checkpoint["student"].values())
    assert not (tmp_path / "model").exists()


def test_an_epoch_sees_every_image_when_the_batch_does_not_divide_the_bucket(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path
) -> None:
    seen: list[Progress] = []
    run = config(epochs=2, batch_size=16, mim=False)  # 24 images: 1.5 batches an epoch
    result = adapt(dtd_subset, CLASSES, tmp_path / "model", base_model=tiny_base_model, config=run, device="cpu",
                   on_progress=seen.append)
    assert result.steps == 3  # ceil(2 x 24 / 16): the remainder of each epoch is carried, not dropped
    assert seen[-1].epoch == 2 and seen[0].total_steps == 3


@pytest.mark.parametrize(("run", "field"), [
    (MustConfig(epochs=0, num_workers=0), "epochs"),  # zero optimizer steps
    (MustConfig(batch_size=64, num_workers=0), "batch_size"),  # more than the 24 images
])
def test_a_hand_built_config_that_cannot_train_is_refused(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path, run: MustConfig, field: str
) -> None:
    with pytest.raises(ConfigError) as error:
        adapt(dtd_subset, CLASSES, tmp_path / "model", base_model=tiny_base_model, config=run, device="cpu")
    assert error.value.field == field
    assert not (tmp_path / "model").exists()  # never the zero-shot model exported as if adapted


def test_resume_refuses_another_method_config_and_takes_the_jobs_runtime_fields(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    run = config(epochs=2)
    steps: list[int] = []

    def stop_after_two() -> bool:
        return len(steps) >= 2

    with pytest.raises(AdaptCancelled):
        adapt(dtd_subset, CLASSES, tmp_path / "model", base_model=tiny_base_model, config=run, device="cpu",
              work_dir=work, on_checkpoint=lambda _: steps.append(1), should_stop=stop_after_two)
    assert (work / CHECKPOINT_FILE).is_file()

    with pytest.raises(ResumeMismatchError, match=r"config\.tau"):
        adapt(dtd_subset, CLASSES, tmp_path / "model", base_model=tiny_base_model,
              config=config(epochs=2, tau=0.9), device="cpu", work_dir=work)

    relaxed = config(epochs=2, log_every=3, checkpoint_every=5)  # how it runs, not what it computes
    result = adapt(dtd_subset, CLASSES, tmp_path / "model", base_model=tiny_base_model, config=relaxed,
                   device="cpu", work_dir=work)
    assert result.resumed_from_step == 2 and result.steps == 6


def test_a_checkpoint_holding_pickled_objects_is_never_unpickled(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple:
            return (Path("/").joinpath, ("owned",))

    torch.save({"format": "must-checkpoint/1", "payload": Payload()}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="pickled objects"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("extra", [{"align_pseudo_labels": 0.9}, {"unknown_weighting": "ueo_zero_shot"}])
def test_a_resumed_run_with_extra_state_ends_where_an_uninterrupted_one_does(
    extra: dict, tiny_base_model: str, dtd_subset: Path, tmp_path: Path
) -> None:
    """Also with UEO's zero-shot weights: the frozen zero-shot copy comes back from the checkpoint."""
    run = config(epochs=2, tau=0.0, **extra)  # every pseudo-label counts
    whole = adapt(dtd_subset, CLASSES, tmp_path / "whole", base_model=tiny_base_model, config=run, device="cpu")
    work, saved = tmp_path / "work", []
    with pytest.raises(AdaptCancelled):
        adapt(dtd_subset, CLASSES, tmp_path / "resumed", base_model=tiny_base_model, config=run, device="cpu",
              work_dir=work, on_checkpoint=saved.append, should_stop=lambda: len(saved) >= 3)
    checkpoint = load_checkpoint(work)
    assert checkpoint is not None
    assert (checkpoint["teacher_marginal"] is not None) == ("align_pseudo_labels" in extra)
    assert (checkpoint["unknown_anchor"] is not None) == ("unknown_weighting" in extra)
    resumed = adapt(dtd_subset, CLASSES, tmp_path / "resumed", base_model=tiny_base_model, config=run,
                    device="cpu", work_dir=work)
    assert resumed.resumed_from_step == 3
    expected, got = (load_file(str(r.artifact_dir / WEIGHTS_FILE)) for r in (whole, resumed))
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
