"""MDETR's training losses (paper 2.2.2): soft-token prediction, contrastive alignment, L1 and GIoU boxes.

The criterion returns named, unweighted losses; :func:`weight_dict` gives the coefficients, expanded for
the auxiliary decoder layers, and :func:`total_loss` combines them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.config import LossConfig
from mdetr.losses.matcher import HungarianMatcher
from mdetr.models.mdetr import MDETROutput
from mdetr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou


def weight_dict(config: LossConfig, *, num_aux: int, contrastive_align: bool = True,
                isfinal: bool = False) -> dict[str, float]:
    weights = {"loss_ce": config.ce_coef, "loss_bbox": config.bbox_coef, "loss_giou": config.giou_coef}
    if contrastive_align:
        weights["loss_contrastive_align"] = config.contrastive_align_coef
    if isfinal:
        weights["loss_isfinal"] = config.isfinal_coef
    for i in range(num_aux):
        weights.update({f"{k}_{i}": v for k, v in list(weights.items()) if not k[-1].isdigit()})
    return weights


def total_loss(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    return sum(losses[k] * w for k, w in weights.items() if k in losses)


def token_targets(positive_map: Tensor, num_slots: int, mode: str) -> Tensor:
    """(N, S') bool positive map -> (N, S) float soft-token target rows, padded or cut to S slots.

    ``multi_hot`` keeps 1 on every positive token (the official code's behaviour); ``uniform`` spreads
    probability 1 evenly over them (the paper's description).
    """
    target = positive_map.float()
    if target.shape[1] < num_slots:
        target = F.pad(target, (0, num_slots - target.shape[1]))
    target = target[:, :num_slots]
    if mode == "uniform":
        target = target / (target.sum(-1, keepdim=True) + 1e-6)
    return target


def contrastive_align_loss(
    proj_queries: Tensor, proj_tokens: Tensor, positive: Tensor, text_padding_mask: Tensor, temperature: float
) -> Tensor:
    """Sum over the batch of (L_o + L_t) / 2 (MDETR Eq. 1 and 2), not yet normalised by the box count.

    proj_queries (B, Q, C) and proj_tokens (B, L, C) are L2-normalised; positive (B, Q, L) bool marks the
    tokens each query's matched box is aligned with; padding tokens (text_padding_mask True) are not part of
    the sentence and are left out of both softmaxes.
    """
    logits = proj_queries.float() @ proj_tokens.float().transpose(-1, -2) / temperature  # (B, Q, L)
    pad = text_padding_mask[:, None, :].expand_as(logits)
    logits = logits.masked_fill(pad, float("-inf"))
    positive = positive & ~pad
    pos_logits = logits.masked_fill(~positive, 0.0)

    # Eq. 1, object -> tokens: for each query with positives, -mean_{pos} logit + logsumexp over tokens.
    n_pos_q = positive.sum(-1)  # (B, Q)
    box_to_token = -pos_logits.sum(-1) / n_pos_q.clamp(min=1) + torch.logsumexp(logits, dim=-1)
    box_to_token = box_to_token.masked_fill(n_pos_q == 0, 0.0).sum()

    # Eq. 2, token -> objects: for each token with positives, -mean_{pos} logit + logsumexp over queries.
    n_pos_t = positive.sum(1)  # (B, L)
    lse_q = torch.logsumexp(logits.masked_fill(pad, 0.0), dim=1)  # padding columns are dropped below
    token_to_box = -pos_logits.sum(1) / n_pos_t.clamp(min=1) + lse_q
    token_to_box = token_to_box.masked_fill(n_pos_t == 0, 0.0).sum()
    return (box_to_token + token_to_box) / 2


class SetCriterion(nn.Module):
    """Matches predictions to targets and computes MDETR's losses.

    Targets per image: ``boxes`` (N, 4) normalised cxcywh and ``positive_map`` (N, S') bool, the tokens of
    the caption each box is referred to by (same tokenizer and token positions as the model's input); for
    a model with the is-final head (CLEVR-Ref+), ``isfinal`` (N,) 1 for the boxes of the final referred set
    (absent: all 0).
    """

    def __init__(self, *, matcher: HungarianMatcher, config: LossConfig, num_token_slots: int) -> None:
        super().__init__()
        self.matcher = matcher
        self.config = config
        self.num_token_slots = num_token_slots

    def forward(
        self, outputs: MDETROutput, targets: list[dict], num_boxes: float | None = None
    ) -> dict[str, Tensor]:
        """Unweighted losses for the last layer (``loss_ce`` ...) and each aux layer i (``loss_ce_i`` ...).

        num_boxes: the normaliser; defaults to the number of target boxes in ``targets`` (at least 1).
        Distributed training passes the all-reduced mean instead.
        """
        device = outputs.pred_logits.device
        tgt_boxes = [t["boxes"].to(device) for t in targets]
        tgt_tokens = [
            token_targets(t["positive_map"].to(device), self.num_token_slots, self.config.soft_token_target)
            for t in targets
        ]
        if num_boxes is None:
            num_boxes = float(sum(len(b) for b in tgt_boxes))
        num_boxes = max(num_boxes, 1.0)
        losses = self._layer_losses(outputs, tgt_boxes, tgt_tokens, targets, num_boxes)
        for i, aux in enumerate(outputs.aux_outputs):
            aux_losses = self._layer_losses(aux, tgt_boxes, tgt_tokens, targets, num_boxes)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    def _layer_losses(
        self, out: MDETROutput, tgt_boxes: list[Tensor], tgt_tokens: list[Tensor], targets: list[dict],
        num_boxes: float,
    ) -> dict[str, Tensor]:
        indices = self.matcher(out.pred_logits, out.pred_boxes, tgt_boxes, tgt_tokens)
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(
            out.pred_logits.device
        )
        query_idx = torch.cat([src for src, _ in indices]).to(out.pred_logits.device)
        losses = {"loss_ce": self._soft_token_loss(out, indices, batch_idx, query_idx, tgt_tokens, num_boxes)}
        losses.update(self._box_losses(out, indices, batch_idx, query_idx, tgt_boxes, num_boxes))
        if out.proj_queries is not None and out.proj_tokens is not None:
            positive = torch.zeros(out.proj_queries.shape[:2] + out.proj_tokens.shape[1:2], dtype=torch.bool,
                                   device=out.proj_queries.device)
            length = positive.shape[-1]
            for b, (src, tgt) in enumerate(indices):
                pm = targets[b]["positive_map"].to(positive.device)[tgt.to(positive.device)]
                width = min(length, pm.shape[1])
                positive[b, src.to(positive.device), :width] = pm[:, :width].bool()
            loss = contrastive_align_loss(
                out.proj_queries, out.proj_tokens, positive, out.text_padding_mask, self.config.temperature
            )
            losses["loss_contrastive_align"] = loss / num_boxes
        if out.pred_isfinal is not None:
            losses.update(self._isfinal_loss(out, indices, batch_idx, query_idx, targets, num_boxes))
        return losses

    def _isfinal_loss(
        self, out: MDETROutput, indices: list[tuple[Tensor, Tensor]], batch_idx: Tensor, query_idx: Tensor,
        targets: list[dict], num_boxes: float,
    ) -> dict[str, Tensor]:
        """CLEVR-Ref+: BCE with logits of the matched queries' is-final logit against their box's
        ``isfinal``, summed and divided by num_boxes; ``accuracy_isfinal`` (logit > 0) is logged only."""
        logits = out.pred_isfinal[batch_idx, query_idx, 0].float()  # (M,)
        device = logits.device
        wanted = [t.get("isfinal", torch.zeros(len(t["boxes"]))).to(device).float()[tgt.to(device)]
                  for t, (_, tgt) in zip(targets, indices, strict=True)]
        target = torch.cat(wanted) if wanted else logits.new_zeros(0)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / num_boxes
        with torch.no_grad():
            correct = ((logits > 0) == (target > 0.5)).float()
            accuracy = correct.mean() if len(correct) else torch.ones((), device=device)
        return {"loss_isfinal": loss, "accuracy_isfinal": accuracy}

    def _soft_token_loss(
        self, out: MDETROutput, indices: list[tuple[Tensor, Tensor]], batch_idx: Tensor, query_idx: Tensor,
        tgt_tokens: list[Tensor], num_boxes: float,
    ) -> Tensor:
        """Soft-token prediction: cross-entropy to the matched box's token distribution, "no object" else.

        Unmatched queries are down-weighted by eos_coef. Summed over queries, divided by num_boxes.
        """
        logp = out.pred_logits.float().log_softmax(-1)  # (B, Q, S)
        target = torch.zeros_like(logp)
        target[..., -1] = 1.0
        weight = torch.full(logp.shape[:2], self.config.eos_coef, device=logp.device)
        if len(query_idx):
            matched = torch.cat([tgt_tokens[b][tgt] for b, (_, tgt) in enumerate(indices)])
            target[batch_idx, query_idx] = matched
            weight[batch_idx, query_idx] = 1.0
        return ((-(target * logp).sum(-1)) * weight).sum() / num_boxes

    def _box_losses(
        self, out: MDETROutput, indices: list[tuple[Tensor, Tensor]], batch_idx: Tensor, query_idx: Tensor,
        tgt_boxes: list[Tensor], num_boxes: float,
    ) -> dict[str, Tensor]:
        pred = out.pred_boxes[batch_idx, query_idx].float()  # (M, 4)
        if len(pred) == 0:
            zero = out.pred_boxes.sum() * 0.0
            return {"loss_bbox": zero, "loss_giou": zero}
        tgt = torch.cat([tgt_boxes[b][t] for b, (_, t) in enumerate(indices)]).float()
        loss_bbox = F.l1_loss(pred, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}


def build_criterion(config: LossConfig, *, num_token_slots: int) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=config.cost_class, cost_bbox=config.cost_bbox,
                               cost_giou=config.cost_giou)
    return SetCriterion(matcher=matcher, config=config, num_token_slots=num_token_slots)
