import itertools

import pytest
import torch

from mdetr.losses.matcher import HungarianMatcher


def _random_case(batch, queries, sizes, slots=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, slots, generator=g)
    centres = torch.rand(batch, queries, 2, generator=g) * 0.6 + 0.2
    sizes_ = torch.rand(batch, queries, 2, generator=g) * 0.3 + 0.05
    boxes = torch.cat([centres, sizes_], -1)
    tgt_boxes, tgt_tokens = [], []
    for n in sizes:
        c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        s = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        tgt_boxes.append(torch.cat([c, s], -1))
        tokens = torch.zeros(n, slots)
        for i in range(n):
            tokens[i, torch.randint(0, slots - 1, (2,), generator=g)] = 1.0
        tgt_tokens.append(tokens)
    return logits, boxes, tgt_boxes, tgt_tokens


def _brute_force(cost):
    """Minimum-cost assignment of the N targets to distinct queries by trying every permutation."""
    q, n = cost.shape
    best, best_rows = float("inf"), None
    for rows in itertools.permutations(range(q), n):
        total = sum(cost[r, c].item() for c, r in enumerate(rows))
        if total < best - 1e-9:
            best, best_rows = total, rows
    return best, best_rows


@pytest.mark.parametrize("queries,targets", [(3, 2), (4, 4), (5, 3), (2, 2)])
def test_matching_is_optimal_against_brute_force(queries, targets):
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    for seed in range(5):
        logits, boxes, tb, tt = _random_case(1, queries, [targets], seed=seed)
        (src, tgt), = matcher(logits, boxes, tb, tt)
        cost = matcher.cost_matrix(logits, boxes, tb[0], tt[0])
        found = cost[src, tgt].sum().item()
        best, _ = _brute_force(cost)
        assert found == pytest.approx(best, abs=1e-5)
        assert len(set(src.tolist())) == len(src) == targets


def test_cost_matrix_terms_match_direct_computation():
    from mdetr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou

    matcher = HungarianMatcher(cost_class=1.5, cost_bbox=5, cost_giou=2)
    logits, boxes, tb, tt = _random_case(1, 3, [2], seed=3)
    cost = matcher.cost_matrix(logits, boxes, tb[0], tt[0])
    prob = logits[0].softmax(-1)
    for q in range(3):
        for t in range(2):
            expected = (
                -1.5 * (prob[q] * tt[0][t]).sum()
                + 5 * (boxes[0, q] - tb[0][t]).abs().sum()
                - 2 * generalized_box_iou(
                    box_cxcywh_to_xyxy(boxes[0, q : q + 1]), box_cxcywh_to_xyxy(tb[0][t : t + 1])
                )[0, 0]
            )
            assert cost[q, t].item() == pytest.approx(expected.item(), abs=1e-5)


def test_batched_equals_per_image():
    matcher = HungarianMatcher()
    logits, boxes, tb, tt = _random_case(3, 6, [2, 0, 4], seed=1)
    batched = matcher(logits, boxes, tb, tt)
    for b in range(3):
        (src, tgt), = matcher(logits[b : b + 1], boxes[b : b + 1], [tb[b]], [tt[b]])
        assert torch.equal(batched[b][0], src) and torch.equal(batched[b][1], tgt)


def test_empty_targets():
    matcher = HungarianMatcher()
    logits, boxes, _, _ = _random_case(2, 4, [0, 0])
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    tokens = [torch.zeros(0, 8), torch.zeros(0, 8)]
    for src, tgt in matcher(logits, boxes, empty, tokens):
        assert src.numel() == 0 and tgt.numel() == 0 and src.dtype == torch.int64


def test_obvious_assignment():
    """Each target is exactly one prediction's box and tokens: the matcher must pair them."""
    slots = 6
    pred_boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.2, 0.3, 0.1]]])
    logits = torch.full((1, 3, slots), -10.0)
    logits[0, 0, 1] = logits[0, 1, 3] = logits[0, 2, 5] = 10.0
    tgt_boxes = [pred_boxes[0, [1, 0]]]
    tokens = torch.zeros(2, slots)
    tokens[0, 3] = tokens[1, 1] = 1
    (src, tgt), = HungarianMatcher()(logits, pred_boxes, tgt_boxes, [tokens])
    assert dict(zip(tgt.tolist(), src.tolist(), strict=True)) == {0: 1, 1: 0}
