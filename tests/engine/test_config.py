"""Presets, auto values and override validation."""

import math

import pytest

from must_engine.config import ConfigError, MustConfig, fairness_uses_moving_average, resolve_config
from must_engine.presets import AUTO_SMALL_STEPS, PRESETS, ModelGeometry

B16 = ModelGeometry(image_size=224, patch_size=16)
L14 = ModelGeometry(image_size=224, patch_size=14, large=True)


def test_paper_presets_for_vit_b16_and_l14() -> None:
    gtsrb = resolve_config("gtsrb", num_images=26_640, num_classes=43, geometry=B16)
    assert (gtsrb.tau, gtsrb.mask_ratio, gtsrb.w_align, gtsrb.base_lr, gtsrb.epochs) == (0.3, 0.5, 0.5, 2e-5, 20)
    assert gtsrb.mask_patch == 32 and gtsrb.batch_size == 1024
    assert gtsrb.lr == pytest.approx(2e-5 * 4)
    imagenet_l = resolve_config("imagenet", num_images=1_281_167, num_classes=1000, geometry=L14)
    assert (imagenet_l.tau, imagenet_l.w_align, imagenet_l.base_lr, imagenet_l.mask_patch) == (0.5, 0.5, 4e-5, 56)
    assert imagenet_l.templates == "imagenet"


# The reference's train_configs.json (salesforce/MUST), transcribed: mask cell in pixels for the family's
# patch size, EMA init, EMA warm-up steps, mask ratio, w_align, tau (conf_threshold), base lr, epochs,
# and the fairness weight (1.0 where the reference adds L_fair unweighted; 0.2 for SUN397).
REFERENCE = {
    ("imagenet", "B"): (32, 0.999, 2000, 0.3, 0.2, 0.7, 2e-5, 30, 1.0),
    ("imagenet", "L"): (56, 0.999, 2000, 0.3, 0.5, 0.5, 4e-5, 20, 1.0),
    ("sun397", "B"): (32, 0.99, 500, 0.1, 1.0, 0.4, 1e-4, 20, 0.2),
    ("sun397", "L"): (28, 0.99, 500, 0.2, 0.5, 0.3, 2e-4, 20, 0.2),
    ("food101", "B"): (32, 0.999, 2000, 0.1, 0.1, 0.7, 2e-5, 40, 1.0),
    ("food101", "L"): (56, 0.999, 2000, 0.1, 0.1, 0.7, 4e-5, 40, 1.0),
    ("gtsrb", "B"): (32, 0.99, 500, 0.5, 0.5, 0.3, 2e-5, 20, 1.0),
    ("gtsrb", "L"): (56, 0.99, 500, 0.3, 0.5, 0.2, 4e-5, 20, 1.0),
    ("dtd", "B"): (32, 0.99, 100, 0.1, 0.2, 0.4, 2e-5, 60, 1.0),
    ("dtd", "L"): (56, 0.99, 100, 0.1, 0.5, 0.5, 4e-5, 60, 1.0),
    ("ucf101", "B"): (16, 0.99, 500, 0.1, 0.5, 0.5, 1e-5, 60, 1.0),
    ("ucf101", "L"): (28, 0.99, 500, 0.1, 0.5, 0.6, 2e-5, 60, 1.0),
    ("pets", "B"): (32, 0.99, 100, 0.1, 0.2, 0.7, 1e-5, 60, 1.0),
    ("caltech101", "B"): (32, 0.99, 100, 0.1, 0.2, 0.7, 1e-5, 60, 1.0),
}


@pytest.mark.parametrize(("preset", "family"), sorted(REFERENCE))
def test_presets_match_the_reference_table(preset: str, family: str) -> None:
    config = resolve_config(preset, num_images=100_000, num_classes=10, geometry=B16 if family == "B" else L14)
    resolved = (config.mask_patch, config.ema_init, config.ema_warmup, config.mask_ratio, config.w_align,
                config.tau, config.base_lr, config.epochs, config.w_fair)
    assert resolved == REFERENCE[preset, family]
    # What the reference fixes for every dataset (train.py's argument defaults).
    assert (config.batch_size, config.ema_final, config.weight_decay, config.layer_decay) == (1024, 0.9998, 0.05, 0.65)
    assert (config.min_lr, config.warmup_steps, config.crop_scale_min) == (1e-6, 0, 0.3)
    assert config.randaugment == "rand-m9-mstd0.5-inc1" and config.mim
    assert not config.balance_classes  # the paper does not balance its predictions


def test_auto_balances_the_classes_over_the_bucket() -> None:
    assert resolve_config(num_images=2000, num_classes=10, geometry=B16).balance_classes
    assert not resolve_config(overrides={"balance_classes": False}, num_images=2000, num_classes=10,
                              geometry=B16).balance_classes


@pytest.mark.parametrize("preset", ["pets", "caltech101"])
def test_presets_without_vit_l_values_take_the_vit_b_column_and_say_so(preset: str) -> None:
    config = resolve_config(preset, num_images=100_000, num_classes=10, geometry=L14)
    b16 = REFERENCE[preset, "B"]
    assert (config.mask_patch, config.tau, config.base_lr) == (b16[0] // 16 * 14, b16[5], b16[6])
    assert any("ViT-B/16 values" in note for note in config.notes)


def test_every_preset_resolves_for_both_families() -> None:
    for preset in PRESETS:
        for geometry in (B16, L14):
            config = resolve_config(preset, num_images=5000, num_classes=20, geometry=geometry)
            assert config.mask_patch % geometry.patch_size == 0


def test_auto_shrinks_the_batch_to_the_data_and_says_so() -> None:
    config = resolve_config(num_images=100, num_classes=10, geometry=B16)
    assert config.batch_size == 64
    assert any("batch_size" in note for note in config.notes)
    assert resolve_config("dtd", num_images=300, num_classes=10, geometry=B16).batch_size == 256


@pytest.mark.parametrize(("num_images", "batch", "epochs"), [
    (16, 16, 60),  # the paper's 60 epochs cap a tiny bucket
    (1000, 128, 16),
    (2000, 128, 8),
    (9999, 128, 2),
    (10_000, 1024, 20),  # from here on the paper's table as it is
    (300_000, 1024, 30),
])
def test_auto_trains_a_small_bucket_for_a_budget_of_steps(num_images: int, batch: int, epochs: int) -> None:
    config = resolve_config(num_images=num_images, num_classes=10, geometry=B16)
    assert (config.batch_size, config.epochs) == (batch, epochs)
    steps = math.ceil(epochs * num_images / batch)
    assert steps >= 60 and (num_images >= 10_000 or AUTO_SMALL_STEPS <= steps < AUTO_SMALL_STEPS + 40 or epochs == 60)
    assert config.balance_init and config.balance_classes
    assert not resolve_config("dtd", num_images=num_images, num_classes=10, geometry=B16).balance_init


@pytest.mark.parametrize(
    ("overrides", "num_classes", "moving"),
    [
        ({}, 64, False),  # one forward pass of the reference's 64 images covers 64 classes
        ({}, 65, True),
        ({"micro_batch_size": 128}, 100, False),
        ({"micro_batch_size": 16}, 20, True),
        ({"batch_size": 32}, 40, True),  # a forward pass never holds more than the batch
        ({"fair_mode": "batch"}, 500, False),
        ({"fair_mode": "moving_average"}, 2, True),
    ],
)
def test_fairness_mode_follows_the_config_and_class_count(overrides: dict, num_classes: int, moving: bool) -> None:
    config = resolve_config(overrides=overrides, num_images=1000, num_classes=num_classes, geometry=B16)
    assert fairness_uses_moving_average(config, num_classes) is moving


def test_overrides_win_and_round_trip_through_dicts() -> None:
    config = resolve_config("dtd", {"tau": 0.8, "epochs": 3}, num_images=4000, num_classes=47, geometry=B16)
    assert (config.tau, config.epochs) == (0.8, 3)
    assert MustConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"nonsense": 1}, "nonsense"),
        ({"tau": 1.5}, "tau"),
        ({"tau": "high"}, "tau"),
        ({"epochs": 2.5}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"mask_patch": 24}, "mask_patch"),
        ({"batch_size": 5000}, "batch_size"),
        ({"ema_init": 0.9999}, "ema_init"),
        ({"fair_mode": "sometimes"}, "fair_mode"),
        ({"templates": "klingon"}, "templates"),
        ({"input_size": 448}, "input_size"),
        ({"batch_size": 64, "micro_batch_size": 48}, "micro_batch_size"),
    ],
)
def test_bad_overrides_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_config(overrides=overrides, num_images=4000, num_classes=10, geometry=B16)
    assert error.value.field == field
    assert error.value.code == "invalid_config"


def test_unknown_preset_has_its_own_code() -> None:
    with pytest.raises(ConfigError) as error:
        resolve_config("mnist", num_images=100, num_classes=10)
    assert error.value.code == "unknown_preset"
