"""2-D sine position embedding (DETR / MDETR default)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine embedding of normalised (y, x) positions of the valid pixels of a padded feature map.

    ``forward(mask)`` takes the padding mask (B, H, W), True on padding, and returns
    (B, 2 * num_pos_feats, H, W): the first half encodes y, the second x. Positions are cumulative counts
    of valid pixels, normalised by the valid extent and scaled to [0, 2*pi], so padding does not shift the
    embedding of real pixels.
    """

    def __init__(
        self, *, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)  # (B, H, W)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t  # (B, H, W, F)
        pos_y = y_embed[..., None] / dim_t
        # Interleave sin on even and cos on odd feature indices.
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
