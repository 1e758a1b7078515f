"""Losses of the SMCA object detector: sigmoid focal classification, L1 and GIoU boxes (SMCA Section 4.1).

As for MDETR (:mod:`mdetr.losses.criterion`), the criterion returns named, *unweighted* losses for the last
decoder layer (``loss_ce``, ``loss_bbox``, ``loss_giou``) and each auxiliary layer (``..._i``);
:func:`detection_weight_dict` holds the coefficients (paper: 2, 5, 2) and
:func:`mdetr.losses.criterion.total_loss` combines them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.config import LossConfig
from mdetr.losses.matcher import HungarianMatcher
from mdetr.models.detector import DetectionOutput
from mdetr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou

# Keeps log(p) finite in the matcher's focal cost when a probability underflows to 0.
_LOG_EPS = 1e-8


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss of sigmoid logits (Lin et al. 2017, Eq. 5), not reduced.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p_t = p`` and ``alpha_t = alpha`` where the target is
    1, ``p_t = 1 - p`` and ``alpha_t = 1 - alpha`` where it is 0; ``alpha < 0`` disables the weighting.
    logits and targets (float in [0, 1]) have the same shape.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log(p_t), stable
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def detection_weight_dict(config: LossConfig, *, num_aux: int) -> dict[str, float]:
    """Coefficients of the named losses, repeated for the ``num_aux`` auxiliary decoder layers."""
    weights = {"loss_ce": config.ce_coef, "loss_bbox": config.bbox_coef, "loss_giou": config.giou_coef}
    for i in range(num_aux):
        weights.update({f"{k}_{i}": v for k, v in list(weights.items()) if not k[-1].isdigit()})
    return weights


class FocalHungarianMatcher(HungarianMatcher):
    """Hungarian matching with the focal-loss class cost of SMCA / Deformable DETR:

        cost_class = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)),

    the focal loss of calling the query's box positive for the target's category minus that of calling it
    negative, with p the query's sigmoid probability of that category. Box costs are DETR's.
    """

    def __init__(self, *, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou)
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrix(
        self, pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: Tensor, tgt_labels: Tensor
    ) -> Tensor:
        """(B*Q, N) cost. pred_logits (B, Q, C); pred_boxes (B, Q, 4) and tgt_boxes (N, 4) normalised cxcywh;
        tgt_labels (N,) int64 category ids."""
        prob = pred_logits.flatten(0, 1).float().sigmoid()[:, tgt_labels]  # (B*Q, N)
        positive = self.alpha * (1 - prob) ** self.gamma * -(prob + _LOG_EPS).log()
        negative = (1 - self.alpha) * prob**self.gamma * -(1 - prob + _LOG_EPS).log()
        boxes = pred_boxes.flatten(0, 1).float()
        cost_bbox = torch.cdist(boxes, tgt_boxes.float(), p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes.float()))
        cost_class = positive - negative
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(  # type: ignore[override]
        self, pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: list[Tensor], tgt_labels: list[Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(pred_idx, tgt_idx)`` of length min(Q, N_b); tgt_labels[b]: (N_b,) category ids."""
        return super().forward(pred_logits, pred_boxes, tgt_boxes, tgt_labels)


class DetectionCriterion(nn.Module):
    """Matches predictions to targets and computes the focal, L1 and GIoU losses, each divided by the
    number of target boxes.

    Targets per image: ``boxes`` (N, 4) normalised cxcywh and ``labels`` (N,) int64 category ids below the
    model's number of classes.
    """

    def __init__(self, *, matcher: FocalHungarianMatcher, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.matcher = matcher
        self.alpha = alpha
        self.gamma = gamma

    def forward(
        self, outputs: DetectionOutput, targets: list[dict], num_boxes: float | None = None
    ) -> dict[str, Tensor]:
        """Unweighted losses of the last layer (``loss_ce``, ``loss_bbox``, ``loss_giou``) and each aux layer
        i (``loss_ce_i`` ...). num_boxes: the normaliser, by default the number of target boxes (>= 1)."""
        device = outputs.pred_logits.device
        boxes = [t["boxes"].to(device) for t in targets]
        labels = [t["labels"].to(device) for t in targets]
        num_classes = outputs.pred_logits.shape[-1]
        for target, lab in zip(targets, labels, strict=True):
            if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
                raise ValueError(f"image id {target.get('image_id')}: category ids {lab.tolist()} outside "
                                 f"the model's 0..{num_classes - 1}; raise model.num_classes")
        if num_boxes is None:
            num_boxes = float(sum(len(b) for b in boxes))
        num_boxes = max(num_boxes, 1.0)
        losses = self._layer_losses(outputs, boxes, labels, num_boxes)
        for i, aux in enumerate(outputs.aux_outputs):
            aux_losses = self._layer_losses(aux, boxes, labels, num_boxes)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    def _layer_losses(self, out: DetectionOutput, boxes: list[Tensor], labels: list[Tensor],
                      num_boxes: float) -> dict[str, Tensor]:
        indices = self.matcher(out.pred_logits, out.pred_boxes, boxes, labels)
        device = out.pred_logits.device
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([src for src, _ in indices]).to(device)
        logits = out.pred_logits.float()
        target = torch.zeros_like(logits)  # (B, Q, C) one-hot of the matched category, 0 elsewhere
        if len(query_idx):
            matched = torch.cat([labels[b][tgt] for b, (_, tgt) in enumerate(indices)])
            target[batch_idx, query_idx, matched] = 1.0
        focal = sigmoid_focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma)
        losses = {"loss_ce": focal.sum() / num_boxes}
        pred = out.pred_boxes[batch_idx, query_idx].float()  # (M, 4)
        if len(pred) == 0:
            zero = out.pred_boxes.sum() * 0.0
            return {**losses, "loss_bbox": zero, "loss_giou": zero}
        tgt = torch.cat([boxes[b][t] for b, (_, t) in enumerate(indices)]).float()
        losses["loss_bbox"] = F.l1_loss(pred, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt)))
        losses["loss_giou"] = (1 - giou).sum() / num_boxes
        return losses


def build_detection_criterion(config: LossConfig) -> DetectionCriterion:
    matcher = FocalHungarianMatcher(cost_class=config.cost_class, cost_bbox=config.cost_bbox,
                                    cost_giou=config.cost_giou, alpha=config.focal_alpha,
                                    gamma=config.focal_gamma)
    return DetectionCriterion(matcher=matcher, alpha=config.focal_alpha, gamma=config.focal_gamma)
