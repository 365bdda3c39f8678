"""The bucket's class prior: the share of its images a team expects in each class.

Balancing (must_engine/balance.py) corrects the zero-shot head's label bias by moving its predicted class
marginal to a target. Without a prior that target is uniform, the marginal MUST's fairness term assumes; on a
bucket whose classes are not balanced it takes images from the frequent classes and gives them to the rare
ones (docs/BENCHMARKS.md, section 6.5: up to 11 points below zero-shot on a tenfold long-tailed bucket). OTTER (Shin
et al., NeurIPS 2024) needs only an estimate of the downstream label distribution; a team that knows roughly
how its bucket divides (from its own counts, a sample it looked at, a business figure) gives it here. It is
an input about the bucket, never a label of any image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


class ClassPriorError(ValueError):
    """A class prior that does not describe these classes; the message says what is wrong."""


def _key(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def parse_class_prior(value: Any, class_names: Sequence[str] | None, num_classes: int) -> tuple[float, ...]:
    """A job's `class_prior` -> shares in class order that sum to 1; () for none (the uniform marginal).

    Accepts an object `{class name: weight}` naming every class (case and spacing ignored), or a list of
    `num_classes` weights in class order (what the resolved config stores). Weights are positive numbers on any
    scale: counts, percentages or shares.
    """
    if value is None or (isinstance(value, Sequence | Mapping) and not isinstance(value, str) and len(value) == 0):
        return ()
    if isinstance(value, Mapping):
        if class_names is None:
            raise ClassPriorError("class_prior by class name needs the job's class names")
        index = {_key(name): i for i, name in enumerate(class_names)}
        weights: list[Any] = [None] * len(class_names)
        for name, weight in value.items():
            position = index.get(_key(name))
            if position is None:
                raise ClassPriorError(f"class_prior names {name!r}, which is not one of the class names")
            if weights[position] is not None:
                raise ClassPriorError(f"class_prior names {class_names[position]!r} twice")
            weights[position] = weight
        missing = [class_names[i] for i, weight in enumerate(weights) if weight is None]
        if missing:
            raise ClassPriorError(f"class_prior must give every class a weight; missing: {', '.join(missing[:5])}"
                                  + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_classes:
            raise ClassPriorError(f"class_prior as a list needs {num_classes} weights, one per class, got {len(value)}")
        weights = list(value)
    else:
        raise ClassPriorError("class_prior must be an object {class name: weight} or a list of weights")
    for position, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            label = class_names[position] if class_names is not None else f"class {position}"
            raise ClassPriorError(f"class_prior weight of {label!r} must be a positive number, got {weight!r}")
    total = sum(float(weight) for weight in weights)
    if not math.isfinite(total):
        raise ClassPriorError("class_prior weights are too large to add up; give shares, percentages or counts")
    return tuple(float(weight) / total for weight in weights)


def target_marginal(prior: Sequence[float], num_classes: int) -> torch.Tensor:
    """(K,) float64 class shares balancing moves the predictions to: the prior, or uniform without one."""
    if not prior:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    if len(prior) != num_classes:
        raise ClassPriorError(f"a class prior of {len(prior)} classes for a model of {num_classes}")
    shares = torch.tensor(list(prior), dtype=torch.float64)
    return shares / shares.sum()
