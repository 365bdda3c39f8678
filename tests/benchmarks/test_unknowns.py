"""The unknown-image benchmark's pieces: its AUROC and FPR95 against brute force, its unknown kinds, and the
bucket layout (known images by class, unknown ones by kind, in the asked share)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before open_clip imports huggingface_hub: nothing here may reach a hub

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import unknowns


def test_auroc_is_the_share_of_correctly_ordered_pairs_with_ties_half() -> None:
    generator = torch.Generator().manual_seed(0)
    known = torch.randint(0, 6, (40,), generator=generator).float()  # many ties on purpose
    unknown = torch.randint(2, 9, (30,), generator=generator).float()
    pairs = (unknown[:, None] > known[None, :]).double() + 0.5 * (unknown[:, None] == known[None, :]).double()
    assert unknowns.auroc(known, unknown) == pytest.approx(float(pairs.mean()))
    assert unknowns.auroc(torch.zeros(3), torch.ones(2)) == 1.0


def test_fpr95_counts_unknown_images_below_the_threshold_that_keeps_95_percent_of_known() -> None:
    known = torch.arange(100).float()  # 95th percentile: 94.05
    unknown = torch.tensor([10.0, 94.0, 95.0, 200.0])
    assert unknowns.fpr_at_95_tpr(known, unknown) == 0.5


@pytest.mark.parametrize("kind", unknowns.KINDS)
def test_unknown_kinds_are_deterministic_images(kind: str) -> None:
    first, again = unknowns.unknown_images(kind, 5, seed=3), unknowns.unknown_images(kind, 5, seed=3)
    assert first.shape == (5, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, unknowns.unknown_images(kind, 5, seed=4))


def test_a_bucket_holds_known_images_by_class_and_unknown_ones_in_the_asked_share(tmp_path: Path) -> None:
    folder = unknowns.write_bucket(tmp_path, "brightness", 0.4, known=30, seed=0)
    classes = [str(c) for c in np.load(unknowns.SHARED_DATASETS / "cifar10" / "test.npz")["classes"]]
    paths, labels, kinds = unknowns.bucket_samples(folder, classes)
    assert int((labels >= 0).sum()) == 30 and len(paths) == 50  # 20 unknown = 40% of 50
    assert sorted({k for k in kinds if k != "known"}) == sorted(unknowns.KINDS)
    assert all((label >= 0) == (kind == "known") for label, kind in zip(labels.tolist(), kinds, strict=True))
    assert unknowns.write_bucket(tmp_path, "brightness", 0.4, known=30, seed=0) == folder  # reused, not rewritten
    other = unknowns.write_bucket(tmp_path, "brightness", 0.4, known=30, seed=1)  # another draw, its own folder
    assert other != folder and len(unknowns.bucket_samples(other, classes)[0]) == 50
    assert unknowns.bucket_samples(other, classes)[1].tolist() != labels.tolist()


def test_the_seed_table_charges_each_seed_its_own_clean_gain(capsys: pytest.CaptureFixture[str]) -> None:
    def row(share: float, variant: str, seed: int, top1: float, auroc: float | None = None) -> dict[str, object]:
        extra = {} if auroc is None else {"auroc_entropy_all": auroc, "auroc_entropy_held_out": auroc}
        return {"shift": "fog", "share": share, "variant": variant, "seed": seed, "top1_known": top1, **extra}

    rows = [row(0.0, "zero_shot", 0, 0.40), row(0.0, "auto", 0, 0.50),  # seed 0: clean gain 10
            row(0.4, "zero_shot", 0, 0.40, 0.60), row(0.4, "auto", 0, 0.48, 0.70),  # gain 8: costs 2
            row(0.0, "zero_shot", 1, 0.30), row(0.0, "auto", 1, 0.36),  # seed 1: clean gain 6
            row(0.4, "zero_shot", 1, 0.30, 0.50), row(0.4, "auto", 1, 0.36, 0.56)]  # gain 6: costs 0
    unknowns.print_over_seeds(rows, "entropy")
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| fog 40% | auto |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2] == "2"
    assert cells[4] == "7.00 (6.00 to 8.00)"  # gain over each seed's own zero-shot
    assert cells[5] == "1.00 (0.00 to 2.00)"  # clean gain minus gain, seed by seed
    assert cells[7] == "8.00 (6.00 to 10.00)"  # AUROC over zero-shot's
