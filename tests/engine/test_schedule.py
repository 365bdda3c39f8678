"""Mask generator, EMA ramp and layer-wise lr decay."""

import numpy as np
import pytest
import torch

from must_engine.config import resolve_config
from must_engine.ema import EmaTeacher, ema_decay
from must_engine.masking import MaskGenerator
from must_engine.optim import cosine_factor, layer_id, parameter_groups
from must_engine.presets import ModelGeometry


def test_mask_is_patch_aligned_with_the_exact_ratio() -> None:
    generator = MaskGenerator(input_size=224, mask_patch=32, model_patch=16, mask_ratio=0.3)
    mask = generator(np.random.default_rng(0))
    assert mask.shape == (14, 14)
    cells = mask.reshape(7, 2, 7, 2).permute(0, 2, 1, 3).reshape(49, 4)
    assert torch.all((cells.sum(dim=1) == 0) | (cells.sum(dim=1) == 4)), "a 32 px cell hides whole 2x2 patches"
    assert int(cells[:, 0].sum()) == 15  # ceil(49 * 0.3)


def test_masks_differ_between_seeds_and_repeat_for_one_seed() -> None:
    generator = MaskGenerator(input_size=32, mask_patch=8, model_patch=4, mask_ratio=0.5)
    first = generator(np.random.default_rng(1))
    assert torch.equal(first, generator(np.random.default_rng(1)))
    assert not torch.equal(first, generator(np.random.default_rng(2)))


def test_mask_generator_rejects_misaligned_cells() -> None:
    with pytest.raises(ValueError):
        MaskGenerator(input_size=224, mask_patch=24, model_patch=16, mask_ratio=0.3)


def test_ema_decay_ramps_linearly_then_holds() -> None:
    assert ema_decay(0, 0.99, 0.9998, 100) == 0.99
    assert ema_decay(50, 0.99, 0.9998, 100) == pytest.approx(0.9949)
    assert ema_decay(100, 0.99, 0.9998, 100) == pytest.approx(0.9998)
    assert ema_decay(10_000, 0.99, 0.9998, 100) == pytest.approx(0.9998)
    assert ema_decay(5, 0.99, 0.9998, 0) == 0.9998


def test_ema_update_moves_teacher_towards_student() -> None:
    student = torch.nn.Linear(2, 2)
    teacher = EmaTeacher(student)
    with torch.no_grad():
        before = teacher.module.weight.clone()
        student.weight.add_(1.0)
    teacher.update(0.9)
    assert torch.allclose(teacher.module.weight, before + 0.1)
    assert not teacher.module.weight.requires_grad


def test_layer_ids_follow_the_reference_assignment() -> None:
    assert layer_id("classifier.visual.conv1.weight", 12, "embed") == 0
    assert layer_id("classifier.visual.positional_embedding", 12, "embed") == 0
    assert layer_id("classifier.visual.transformer.resblocks.0.attn.in_proj_weight", 12, "embed") == 1
    assert layer_id("classifier.visual.transformer.resblocks.11.mlp.c_fc.weight", 12, "embed") == 12
    assert layer_id("classifier.head", 12, "embed") == 13
    assert layer_id("decoder.0.weight", 12, "embed") == 13
    assert layer_id("mask_token", 12, "embed") == 0
    assert layer_id("mask_token", 12, "head") == 13


def test_parameter_groups_scale_lr_by_depth_and_skip_decay_on_vectors(tiny_base_model: str) -> None:
    from must_engine.base_models import load_base_model
    from must_engine.models import MustModel
    from must_engine.zeroshot import zero_shot_classifier

    model = MustModel(zero_shot_classifier(load_base_model(tiny_base_model), ["a", "b"]))
    config = resolve_config(num_images=64, num_classes=2, geometry=ModelGeometry(32, 8))
    groups = {tuple(g["names"]): g for g in parameter_groups(model, config, num_layers=2)}
    by_name = {name: group for names, group in groups.items() for name in names}
    assert by_name["classifier.visual.conv1.weight"]["lr_scale"] == pytest.approx(0.65**3)
    assert by_name["classifier.visual.transformer.resblocks.1.mlp.c_fc.weight"]["lr_scale"] == pytest.approx(0.65)
    assert by_name["classifier.head"]["lr_scale"] == 1.0
    assert by_name["classifier.visual.transformer.resblocks.1.mlp.c_fc.bias"]["weight_decay"] == 0.0
    assert by_name["classifier.head"]["weight_decay"] == 0.05
    assert sum(len(names) for names in groups) == sum(1 for _ in model.parameters())


def test_cosine_schedule_starts_at_peak_and_ends_at_floor() -> None:
    assert cosine_factor(0, 100, 0, 0.1) == pytest.approx(1.0)
    assert cosine_factor(50, 100, 0, 0.1) == pytest.approx(0.55)
    assert cosine_factor(100, 100, 0, 0.1) == pytest.approx(0.1)
    assert cosine_factor(4, 100, 10, 0.0) == pytest.approx(0.5)
