"""Zero-shot head: class names x prompt templates -> a D x K matrix of normalised text embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from must_engine.base_models import LoadedBaseModel
from must_engine.models import CLIP_LOGIT_SCALE, ImageClassifier
from must_engine.templates import TEMPLATE_SETS


@torch.no_grad()
def text_head(base: LoadedBaseModel, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """For each class: fill every template, encode, L2-normalise, average, renormalise (CLIP's recipe)."""
    model = base.model.eval()
    device = next(model.parameters()).device
    columns = []
    for name in class_names:
        tokens = base.tokenizer([template.format(name) for template in templates]).to(device)
        embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)
        columns.append(F.normalize(embeddings.mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


def zero_shot_classifier(
    base: LoadedBaseModel, class_names: Sequence[str], template_set: str = "default"
) -> ImageClassifier:
    """The image tower with its text-derived head; the text tower is not referenced afterwards."""
    head = text_head(base, class_names, TEMPLATE_SETS[template_set])
    scale = float(base.model.logit_scale.detach().exp().clamp(max=CLIP_LOGIT_SCALE))
    return ImageClassifier(base.model.visual, head, logit_scale=scale)
