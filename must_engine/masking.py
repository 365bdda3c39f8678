"""Patch-aligned random masks, as in SimMIM and the MUST reference code.

The mask is drawn on a coarse grid of `mask_patch`-pixel cells, then upsampled to the model's patch grid,
so a masked cell hides whole patches (e.g. 2x2 ViT-B/16 patches for a 32 px cell).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class MaskGenerator:
    def __init__(self, input_size: int, mask_patch: int, model_patch: int, mask_ratio: float) -> None:
        if input_size % mask_patch or mask_patch % model_patch:
            raise ValueError(
                f"mask_patch {mask_patch} must divide input_size {input_size} and be a multiple of "
                f"the model patch {model_patch}"
            )
        self.cells_per_side = input_size // mask_patch
        self.scale = mask_patch // model_patch
        cells = self.cells_per_side**2
        self.num_masked = math.ceil(cells * mask_ratio)

    def __call__(self, rng: np.random.Generator) -> torch.Tensor:
        """A (grid, grid) 0/1 tensor over the model's patch grid with exactly `num_masked` cells set."""
        cells = self.cells_per_side**2
        flat = np.zeros(cells, dtype=np.float32)
        flat[rng.permutation(cells)[: self.num_masked]] = 1.0
        grid = flat.reshape(self.cells_per_side, self.cells_per_side)
        grid = grid.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        return torch.from_numpy(grid)
