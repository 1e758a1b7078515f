"""Hungarian matching between predicted boxes and ground-truth boxes (DETR, MDETR paper 2.2.2)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mdetr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising

        C = cost_class * (-p . t) + cost_bbox * L1(b_pred, b_gt) + cost_giou * (-GIoU(b_pred, b_gt)),

    where p is the softmax over token slots of a query and t the target's token map (so the class cost is
    minus the probability mass the query puts on the target's tokens).
    """

    def __init__(self, *, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrix(
        self, pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: Tensor, tgt_tokens: Tensor
    ) -> Tensor:
        """(B*Q, N) cost for B*Q flattened queries against N targets.

        pred_logits (B, Q, S); pred_boxes (B, Q, 4) normalised cxcywh; tgt_boxes (N, 4) normalised cxcywh;
        tgt_tokens (N, S) float target token distribution (multi-hot or uniform).
        """
        prob = pred_logits.flatten(0, 1).float().softmax(-1)  # (B*Q, S)
        boxes = pred_boxes.flatten(0, 1).float()
        cost_class = -(prob @ tgt_tokens.T.float())
        cost_bbox = torch.cdist(boxes, tgt_boxes.float(), p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes.float()))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(
        self, pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: list[Tensor], tgt_tokens: list[Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image, ``(pred_idx, tgt_idx)`` int64 index tensors of equal length min(Q, N_b).

        tgt_boxes[b]: (N_b, 4) normalised cxcywh; tgt_tokens[b]: (N_b, S). The costs of the whole batch are
        computed in one go and split per image before solving.
        """
        batch, num_queries = pred_logits.shape[:2]
        sizes = [len(b) for b in tgt_boxes]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in sizes]
        cost = self.cost_matrix(pred_logits, pred_boxes, torch.cat(tgt_boxes), torch.cat(tgt_tokens))
        # A diverged prediction (NaN or infinite outputs) must not stop the solver: such a query becomes
        # the last choice; its non-finite gradients (or an all-NaN step's losses) make training skip the
        # step.
        cost = cost.view(batch, num_queries, -1).cpu().nan_to_num(nan=1e9, posinf=1e9, neginf=1e9)
        indices = []
        for b, block in enumerate(cost.split(sizes, dim=-1)):
            if sizes[b] == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(block[b].numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices
