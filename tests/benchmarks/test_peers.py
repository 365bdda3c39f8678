"""The label-propagation peer does what it is for: labels spread along the bucket's neighbourhoods."""

from __future__ import annotations

import torch

from benchmarks.peers import label_propagation, sinkhorn_balance


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
