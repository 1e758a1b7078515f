import math

import pytest
import torch

from mdetr.config import LossConfig
from mdetr.losses.criterion import build_criterion, contrastive_align_loss, token_targets, weight_dict
from mdetr.models.mdetr import MDETROutput


def _eq1_eq2_direct(o, t, positive, length):
    """MDETR Eq. 1 and 2 written term by term with Python loops (one image, unpadded tokens 0..length-1)."""
    tau = 0.07
    l_o = 0.0
    for i in range(o.shape[0]):
        pos = [j for j in range(length) if positive[i, j]]
        if not pos:
            continue
        denom = sum(math.exp(float(o[i] @ t[k]) / tau) for k in range(length))
        l_o += sum(-math.log(math.exp(float(o[i] @ t[j]) / tau) / denom) for j in pos) / len(pos)
    l_t = 0.0
    for i in range(length):
        pos = [j for j in range(o.shape[0]) if positive[j, i]]
        if not pos:
            continue
        denom = sum(math.exp(float(t[i] @ o[k]) / tau) for k in range(o.shape[0]))
        l_t += sum(-math.log(math.exp(float(t[i] @ o[j]) / tau) / denom) for j in pos) / len(pos)
    return (l_o + l_t) / 2


def test_contrastive_alignment_matches_equations_1_and_2():
    g = torch.Generator().manual_seed(0)
    q, length, padded, dim = 5, 6, 8, 16
    o = torch.nn.functional.normalize(torch.randn(1, q, dim, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(1, padded, dim, generator=g), dim=-1)
    positive = torch.zeros(1, q, padded, dtype=torch.bool)
    positive[0, 0, [1, 2]] = True
    positive[0, 3, [2, 4]] = True
    positive[0, 4, 5] = True
    padding = torch.zeros(1, padded, dtype=torch.bool)
    padding[0, length:] = True
    got = contrastive_align_loss(o, t, positive, padding, 0.07)
    expected = _eq1_eq2_direct(o[0], t[0], positive[0], length)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_token_targets_modes():
    pm = torch.zeros(2, 10, dtype=torch.bool)
    pm[0, [1, 2]] = True
    pm[1, 4] = True
    multi = token_targets(pm, 12, "multi_hot")
    uniform = token_targets(pm, 12, "uniform")
    assert multi.shape == (2, 12) and multi[0, 1] == 1 and multi[0, 2] == 1
    assert uniform[0, 1].item() == pytest.approx(0.5, abs=1e-5)
    assert uniform.sum(-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def _outputs(batch=2, queries=4, slots=8, length=6, aux=1, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)

    def layer():
        return MDETROutput(
            pred_logits=torch.randn(batch, queries, slots, generator=g).requires_grad_(requires_grad),
            pred_boxes=(torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.2).requires_grad_(requires_grad),
            proj_queries=torch.nn.functional.normalize(torch.randn(batch, queries, 8, generator=g), dim=-1),
            proj_tokens=torch.nn.functional.normalize(torch.randn(batch, length, 8, generator=g), dim=-1),
            text_padding_mask=torch.zeros(batch, length, dtype=torch.bool),
        )

    out = layer()
    out.aux_outputs = [layer() for _ in range(aux)]
    return out


def _targets():
    pm0 = torch.zeros(2, 256, dtype=torch.bool)
    pm0[0, 1:3] = True
    pm0[1, 4] = True
    return [
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.1, 0.3]]), "positive_map": pm0},
        {"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 256, dtype=torch.bool)},
    ]


def test_soft_token_loss_direct_computation():
    """loss_ce = (sum over matched -sum_t target*logp + eos_coef * sum over unmatched -log p_noobj) /
    num_boxes."""
    config = LossConfig()
    criterion = build_criterion(config, num_token_slots=8)
    out = _outputs(aux=0)
    targets = _targets()
    losses = criterion(out, targets)
    tokens = [token_targets(t["positive_map"], 8, "multi_hot") for t in targets]
    indices = criterion.matcher(out.pred_logits, out.pred_boxes, [t["boxes"] for t in targets], tokens)
    logp = out.pred_logits.detach().log_softmax(-1)
    expected = 0.0
    for b in range(2):
        matched = dict(zip(indices[b][0].tolist(), indices[b][1].tolist(), strict=True))
        for q in range(4):
            if q in matched:
                expected += -(tokens[b][matched[q]] * logp[b, q]).sum().item()
            else:
                expected += -0.1 * logp[b, q, -1].item()
    assert losses["loss_ce"].item() == pytest.approx(expected / 2, rel=1e-5)


def test_losses_finite_with_gradients_and_aux_keys():
    config = LossConfig()
    criterion = build_criterion(config, num_token_slots=8)
    out = _outputs(aux=2)
    losses = criterion(out, _targets())
    weights = weight_dict(config, num_aux=2)
    assert set(weights) == set(losses)
    total = sum(losses[k] * w for k, w in weights.items())
    assert torch.isfinite(total)
    total.backward()
    assert out.pred_logits.grad is not None and out.pred_logits.grad.abs().sum() > 0
    assert out.pred_boxes.grad.abs().sum() > 0


def test_diverged_predictions_do_not_stop_training():
    """NaN boxes (fp16 overflow, a diverged step) raise nothing: the matcher takes a NaN query last, so
    with two of four queries NaN the two targets go to the others and the losses stay finite; with every
    query NaN the box losses are NaN, which the training loop counts and skips."""
    criterion = build_criterion(LossConfig(), num_token_slots=8)
    out = _outputs(aux=0)
    with torch.no_grad():
        out.pred_boxes[0, :2] = float("nan")
    losses = criterion(out, _targets())
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        out.pred_boxes[0] = float("nan")
    losses = criterion(out, _targets())
    assert torch.isnan(losses["loss_bbox"]) and torch.isnan(losses["loss_giou"])


def test_perfect_boxes_give_zero_box_losses():
    criterion = build_criterion(LossConfig(), num_token_slots=8)
    out = _outputs(batch=1, aux=0)
    target = _targets()[0]
    with torch.no_grad():
        out.pred_boxes[0, :2] = target["boxes"]
        out.pred_logits[0, 0] = -20.0
        out.pred_logits[0, 0, [1, 2]] = 20.0
        out.pred_logits[0, 1] = -20.0
        out.pred_logits[0, 1, 4] = 20.0
    losses = criterion(out, [target])
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)


def test_all_empty_targets_only_no_object_loss():
    criterion = build_criterion(LossConfig(), num_token_slots=8)
    out = _outputs(aux=0)
    empty = {"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 256, dtype=torch.bool)}
    losses = criterion(out, [empty, empty])
    expected = -0.1 * out.pred_logits.detach().log_softmax(-1)[..., -1].sum().item()  # num_boxes clamps to 1
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_contrastive_align"].item() == 0.0
