"""Each MUST loss against small hand-computed cases."""

import math

import torch

from must_engine.losses import align_distribution, align_loss, fairness_loss, mim_loss, self_training_loss


def test_self_training_uses_only_confident_pseudo_labels() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45]])
    loss, keep = self_training_loss(logits, teacher, tau=0.6)
    assert keep.tolist() == [True, True, False]
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad[2] == 0)


def test_self_training_with_no_confident_sample_is_a_finite_zero_in_the_graph() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    teacher = torch.full((4, 3), 1 / 3)
    loss, keep = self_training_loss(logits, teacher, tau=0.9)
    assert not keep.any()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_fairness_is_minimal_for_a_uniform_mean_prediction() -> None:
    uniform, _ = fairness_loss(torch.tensor([0.25, 0.25, 0.25, 0.25]), None, 0.0)
    skewed, _ = fairness_loss(torch.tensor([0.7, 0.1, 0.1, 0.1]), None, 0.0)
    assert math.isclose(uniform.item(), math.log(4), rel_tol=1e-6)
    expected = -(math.log(0.7) + 3 * math.log(0.1)) / 4
    assert math.isclose(skewed.item(), expected, rel_tol=1e-6)


def test_fairness_moving_average_mixes_the_previous_mean_and_rescales() -> None:
    previous = torch.tensor([0.5, 0.5])
    current = torch.tensor([0.9, 0.1], requires_grad=True)
    loss, carried = fairness_loss(current, previous, momentum=0.5)
    averaged = torch.tensor([0.7, 0.3])
    assert torch.allclose(carried, averaged)
    assert math.isclose(loss.item(), -(math.log(0.7) + math.log(0.3)) / 2 / 0.5, rel_tol=1e-6)
    assert not carried.requires_grad


def test_mim_loss_counts_only_masked_pixels() -> None:
    images = torch.zeros(1, 3, 4, 4)
    reconstruction = torch.zeros(1, 3, 4, 4)
    reconstruction[:, :, :2, :2] = 1.0  # error in the masked top-left patch
    reconstruction[:, :, 2:, 2:] = 5.0  # error in an unmasked patch: must not count
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # sum |err| over 3 channels x 4 pixels = 12, / 4 masked pixels / 3 channels = 1.0
    assert math.isclose(mim_loss(reconstruction, images, mask, patch_size=2).item(), 1.0, rel_tol=1e-6)


def test_align_loss_is_mean_squared_distance_of_masked_tokens_to_cls() -> None:
    cls = torch.tensor([[1.0, 0.0]])
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # tokens 1 and 2 masked
    # |(0,1)-(1,0)|^2 = 2, |(-1,0)-(1,0)|^2 = 4 -> mean 3
    assert math.isclose(align_loss(cls, patches, mask).item(), 3.0, rel_tol=1e-6)


def test_align_nearest_k_targets_visible_neighbours() -> None:
    cls = torch.tensor([[0.0, 1.0]])
    patches = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])  # token 3 masked; its visible neighbours all (1, 0)
    loss = align_loss(cls, patches, mask, target="nearest_k", k=2)
    assert math.isclose(loss.item(), 2.0, rel_tol=1e-6)


def test_distribution_alignment_divides_by_the_running_marginal() -> None:
    probs = torch.tensor([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])  # the head favours class 0
    aligned, marginal = align_distribution(probs, None, momentum=0.9)
    assert torch.allclose(marginal, torch.tensor([0.75, 0.25]))
    expected = probs / marginal
    assert torch.allclose(aligned, expected / expected.sum(dim=1, keepdim=True))
    assert torch.allclose(aligned.sum(dim=1), torch.ones(4))
    assert aligned[:, 0].mean() < probs[:, 0].mean()  # the favoured class loses its head start
    assert (aligned.argmax(dim=1) == torch.tensor([0, 1, 1, 0])).all()
    _, updated = align_distribution(torch.tensor([[0.5, 0.5]]), marginal, momentum=0.9)
    assert torch.allclose(updated, 0.9 * marginal + 0.1 * torch.tensor([0.5, 0.5]))
