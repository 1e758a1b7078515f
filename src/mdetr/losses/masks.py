"""Mask losses of the segmentation model (MDETR Section 4.3, as DETR's panoptic head): sigmoid focal loss and
dice loss on the masks of the queries matched to a target box.

:class:`SegmentationCriterion` adds ``loss_mask`` (focal) and ``loss_dice`` to MDETR's box and soft-token
losses (:class:`~mdetr.losses.criterion.SetCriterion`). Both are sums over the matched masks divided by the
number of target boxes, as the official code; they are computed for the last decoder layer only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.losses.criterion import SetCriterion, token_targets
from mdetr.losses.detection import sigmoid_focal_loss
from mdetr.models.mdetr import MDETROutput


def dice_loss(logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """Sum over masks of ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``, divided by ``num_boxes``.

    logits (M, P) mask logits flattened over pixels; targets (M, P) float 0/1; p = sigmoid(logits). The +1
    keeps the loss defined (and 0) for an empty target predicted empty.
    """
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(-1) + 1
    denominator = prob.sum(-1) + targets.sum(-1) + 1
    return (1 - numerator / denominator).sum() / num_boxes


def mask_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, *, alpha: float = 0.25,
                    gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (alpha 0.25, gamma 2) averaged over each mask's pixels, summed over masks, divided
    by ``num_boxes``. logits and targets (M, P) as in :func:`dice_loss`."""
    return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma).mean(-1).sum() / num_boxes


def padded_target_masks(targets: list[dict], height: int, width: int, device: torch.device) -> list[Tensor]:
    """Each image's ``masks`` (N_b, h_b, w_b) bool, zero-padded at the bottom and right to (height, width)."""
    padded = []
    for target in targets:
        if "masks" not in target:
            raise ValueError(f"image id {target.get('image_id')}: mask training needs the target's 'masks' "
                             "(a dataset read with masks, e.g. mdetr.data.phrasecut.PhraseCutDataset)")
        masks = target["masks"].to(device)
        if masks.shape[0] != target["boxes"].shape[0]:
            raise ValueError(f"image id {target.get('image_id')}: {masks.shape[0]} masks for "
                             f"{target['boxes'].shape[0]} boxes")
        h, w = masks.shape[-2:]
        padded.append(F.pad(masks.float(), (0, width - w, 0, height - h)))
    return padded


class SegmentationCriterion(nn.Module):
    """MDETR's losses plus ``loss_mask`` (focal) and ``loss_dice`` on the last layer's matched masks.

    Targets per image: those of :class:`SetCriterion` and ``masks`` (N, h, w) bool at the transformed image's
    size (``size``). Predicted masks (stride 4 of the padded batch) are upsampled bilinearly to the largest
    image of the batch, which is the padded batch when it is padded to its largest image (no
    ``size_divisibility``), as the official code.
    """

    def __init__(self, detection: SetCriterion, *, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.detection = detection
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, outputs: MDETROutput, targets: list[dict], num_boxes: float | None = None
                ) -> dict[str, Tensor]:
        if outputs.pred_masks is None:
            raise ValueError("SegmentationCriterion needs a segmentation model's outputs (model.masks=true)")
        losses = self.detection(outputs, targets, num_boxes=num_boxes)
        if num_boxes is None:
            num_boxes = float(sum(len(t["boxes"]) for t in targets))
        losses.update(self.mask_losses(outputs, targets, max(num_boxes, 1.0)))
        return losses

    def mask_losses(self, outputs: MDETROutput, targets: list[dict], num_boxes: float) -> dict[str, Tensor]:
        device = outputs.pred_masks.device
        tgt_boxes = [t["boxes"].to(device) for t in targets]
        config = self.detection.config
        tgt_tokens = [token_targets(t["positive_map"].to(device), self.detection.num_token_slots,
                                    config.soft_token_target) for t in targets]
        indices = self.detection.matcher(outputs.pred_logits, outputs.pred_boxes, tgt_boxes, tgt_tokens)
        height = max(int(t["size"][0]) for t in targets)
        width = max(int(t["size"][1]) for t in targets)
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([src for src, _ in indices]).to(device)
        if len(query_idx) == 0:
            zero = outputs.pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        masks = padded_target_masks(targets, height, width, device)
        tgt = torch.cat([masks[b][t.to(device)] for b, (_, t) in enumerate(indices)]).flatten(1)  # (M, H*W)
        pred = outputs.pred_masks[batch_idx, query_idx].float()[:, None]  # (M, 1, h/4, w/4)
        pred = F.interpolate(pred, size=(height, width), mode="bilinear", align_corners=False).flatten(1)
        return {"loss_mask": mask_focal_loss(pred, tgt, num_boxes, alpha=self.alpha, gamma=self.gamma),
                "loss_dice": dice_loss(pred, tgt, num_boxes)}


def mask_weight_dict(*, mask_coef: float, dice_coef: float) -> dict[str, float]:
    """Coefficients of the mask losses (official ``mask_loss_coef`` and ``dice_loss_coef``, both 1)."""
    return {"loss_mask": mask_coef, "loss_dice": dice_coef}


__all__ = ["SegmentationCriterion", "dice_loss", "mask_focal_loss", "mask_weight_dict", "padded_target_masks"]
