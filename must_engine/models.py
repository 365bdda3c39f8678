"""The networks: a zero-shot image classifier, and the student/teacher that MUST trains around it.

`ImageClassifier` (CLIP image tower + linear head on the normalised embedding) is all that is exported
and served. `MustModel` wraps it with what only training needs: the learned [MSK] token, the patch
LayerNorm, the linear pixel decoder, and a forward pass that masks patch embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

CLIP_LOGIT_SCALE = 100.0  # OpenAI CLIP's learned temperature (open_clip clamps every model's at 100)


class ImageClassifier(nn.Module):
    """CLIP image tower -> L2-normalised embedding -> linear head (D x K) at the base model's logit scale.

    The paper fixes the scale at 100, which is exactly CLIP's learned value; a base model that learned
    another temperature (the proxy: ~14) keeps its own, or its probabilities (and so tau) lose meaning.
    The scale is a buffer: fixed during training, saved with the weights.

    The head runs in fp32 even under bf16 autocast: at scale 100, bf16 logits of 16-32 are rounded to
    steps of 0.125, enough to move a teacher confidence across tau.

    `class_bias` (K,) is added to the logits and not trained: zero unless the run balances the classes over
    its bucket (must_engine/balance.py), before training (`balance_init`) and/or at export (`balance_classes`).
    """

    def __init__(self, visual: VisionTransformer, head: torch.Tensor, logit_scale: float = CLIP_LOGIT_SCALE) -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
            raise TypeError("MUST needs open_clip's VisionTransformer with [CLS]-token pooling")
        self.visual = visual
        self.head = nn.Parameter(head.detach().clone().float())
        self.logit_scale: torch.Tensor
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.class_bias: torch.Tensor
        self.register_buffer("class_bias", torch.zeros(head.shape[1]))

    @property
    def num_classes(self) -> int:
        return int(self.head.shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.visual(images))

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, D) projected image embedding -> (B, K) fp32 logits, outside autocast."""
        with torch.autocast(embedding.device.type, enabled=False):
            return self.logit_scale * F.normalize(embedding.float(), dim=-1) @ self.head.float() + self.class_bias


@dataclass
class MaskedOutput:
    logits: torch.Tensor  # (B, K)
    reconstruction: torch.Tensor  # (B, 3, H, W) pixels predicted from every patch token
    cls_embedding: torch.Tensor  # (B, D) normalised projected [CLS]
    patch_embeddings: torch.Tensor  # (B, N, D) normalised projected patch tokens


class MustModel(nn.Module):
    """Student (and, deep-copied, EMA teacher) of MUST.

    The new modules are initialised from `seed` (without touching the global RNG), so two runs with the
    same seed start from the same [MSK] token and decoder. Patch dropout, if the base model was built
    with it, is switched off: the decoder needs one token per patch, and masking already is the method's
    token-level regulariser.
    """

    def __init__(self, classifier: ImageClassifier, seed: int = 0) -> None:
        super().__init__()
        self.classifier = classifier
        visual = classifier.visual
        visual.patch_dropout = nn.Identity()
        width = visual.conv1.out_channels
        patch = visual.patch_size[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.normal_(self.mask_token, std=0.02)
            self.ln_patch = nn.LayerNorm(width)
            # SimMIM's linear decoder: one 1x1 conv per token to its patch's pixels, then un-patchify.
            self.decoder = nn.Sequential(nn.Conv2d(width, patch * patch * 3, kernel_size=1), nn.PixelShuffle(patch))

    @property
    def patch_size(self) -> int:
        return int(self.classifier.visual.patch_size[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def forward_masked(self, images: torch.Tensor, mask: torch.Tensor) -> MaskedOutput:
        """mask: (B, grid, grid) with 1 where the patch embedding is replaced by [MSK]."""
        visual = self.classifier.visual
        x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, N, W)
        w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.transformer(visual.ln_pre(x))

        pooled, _ = visual._pool(x)  # ln_post + [CLS], exactly as the unmasked forward
        projected = pooled @ visual.proj
        cls_embedding = F.normalize(projected, dim=-1)
        logits = self.classifier.logits(projected)

        patches = self.ln_patch(x[:, 1:])
        batch, tokens, width = patches.shape
        grid = math.isqrt(tokens)
        reconstruction = self.decoder(patches.transpose(1, 2).reshape(batch, width, grid, grid))
        patch_embeddings = F.normalize(patches @ visual.proj, dim=-1)
        return MaskedOutput(logits, reconstruction, cls_embedding, patch_embeddings)
