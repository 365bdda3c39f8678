"""The label-propagation peer does what it is for: labels spread along the bucket's neighbourhoods; the quality
summary pairs runs by target and seed."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.peers import distribution_normalization, label_propagation, sinkhorn_balance
from benchmarks.quality import paired_differences
from must_engine.models import ImageClassifier


def test_neighbours_outvote_a_wrong_zero_shot_label_that_balancing_alone_keeps() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:2] * 10  # two tight clusters of 20 images, one per class
    labels = torch.arange(2).repeat_interleave(20)
    embeddings = centres[labels] + 0.1 * torch.randn(40, 8, generator=generator)
    probs = torch.full((40, 2), 0.2)
    probs[torch.arange(40), labels] = 0.8
    wrong = torch.tensor([0, 1, 2, 20, 21, 22])  # zero-shot is wrong, less sure, on three images per class
    probs[wrong[:3]] = torch.tensor([0.4, 0.6])
    probs[wrong[3:]] = torch.tensor([0.6, 0.4])

    assert (sinkhorn_balance(probs).argmax(1) != labels).sum() == 6
    propagated = label_propagation(embeddings, probs)
    assert torch.equal(propagated.argmax(1), labels)
    torch.testing.assert_close(propagated.sum(dim=1), torch.ones(40))


def test_paired_differences_match_target_and_seed_and_skip_unpaired_runs() -> None:
    rows = [
        {"target": "fog", "target_dir": "a/fog", "variant": "auto", "seed": 0, "top1": 0.50},
        {"target": "fog", "target_dir": "a/fog", "variant": "balanced", "seed": 0, "top1": 0.45},
        {"target": "fog", "target_dir": "a/fog", "variant": "auto", "seed": 1, "top1": 0.40},
        {"target": "fog", "target_dir": "a/fog", "variant": "balanced", "seed": 1, "top1": 0.45},
        {"target": "fog", "target_dir": "b/fog", "variant": "auto", "seed": 0, "top1": 0.90},  # no balanced run here
        {"target": "fog", "target_dir": "b/fog", "variant": "zero_shot", "seed": 0, "top1": 0.10},
    ]
    differences = paired_differences(rows, "auto", "balanced")
    assert [(target, seed) for target, seed, _ in differences] == [("a/fog", 0), ("a/fog", 1)]
    assert [round(d, 6) for _, _, d in differences] == [5.0, -5.0]


def test_distribution_normalization_takes_the_buckets_mean_out_of_every_image() -> None:
    """Every image shares a component along class 0's embedding, so zero-shot calls them all class 0; DN takes
    out a share of the bucket's mean, which holds that component, and the images' own class wins again."""
    head = torch.eye(4)[:, :2]  # class k is dimension k
    classifier = ImageClassifier.__new__(ImageClassifier)
    nn.Module.__init__(classifier)
    classifier.head = nn.Parameter(head)
    classifier.register_buffer("logit_scale", torch.tensor(10.0))
    classifier.register_buffer("class_bias", torch.zeros(2))
    own = torch.eye(4)[torch.arange(2).repeat(10)]  # 10 images of each class
    embeddings = own + 1.2 * torch.eye(4)[0]  # the shared component: class 1's images read as class 0
    assert (classifier.logits(embeddings).argmax(dim=-1) == 0).all()
    normalized = distribution_normalization(classifier, embeddings, coefficient=1.0)
    assert torch.equal(normalized.argmax(dim=-1), torch.arange(2).repeat(10))
    # a share too small to undo the component leaves zero-shot's labels
    assert (distribution_normalization(classifier, embeddings, coefficient=0.1).argmax(dim=-1) == 0).all()
