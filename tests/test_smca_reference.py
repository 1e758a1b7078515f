"""Grid-initialised SMCA reference centres (``model.smca_reference=grid``)."""

import pytest
import torch

from mdetr.config import ConfigError, ModelConfig
from mdetr.models.smca import SMCADecoder, SMCADecoderLayer, box_from_reference, reference_grid

D, HEADS = 16, 4


def test_reference_grid_is_a_raster_of_cell_centres():
    grid = reference_grid(6)  # 3 columns, 2 rows
    expected = torch.tensor(
        [[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25], [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75]]
    )
    torch.testing.assert_close(grid, expected)
    assert reference_grid(16).unique(dim=0).shape == (16, 2)


def test_grid_references_start_on_the_grid_after_the_transformer_init():
    torch.manual_seed(0)
    layer = SMCADecoderLayer(d_model=D, nhead=HEADS, dim_feedforward=32, dropout=0.0)
    decoder = SMCADecoder(layer, 2, D, grid_queries=9)
    # The transformer's blanket Xavier init touches every matrix, the anchor included; the reset restores it.
    for p in decoder.parameters():
        if p.dim() > 1:
            torch.nn.init.xavier_uniform_(p)
    decoder.reset_prior_parameters()
    queries = torch.randn(9, D)
    centres = decoder.reference_logits(queries).sigmoid()
    torch.testing.assert_close(centres, reference_grid(9))
    # Eq. 12 with a zero box offset puts each initial box on its query's grid cell.
    boxes = box_from_reference(torch.zeros(9, 4), decoder.reference_logits(queries))
    torch.testing.assert_close(boxes[:, :2], reference_grid(9))


def test_grid_references_learn_per_query_offsets_and_the_mlp():
    layer = SMCADecoderLayer(d_model=D, nhead=HEADS, dim_feedforward=32, dropout=0.0)
    decoder = SMCADecoder(layer, 1, D, grid_queries=4)
    decoder.reset_prior_parameters()
    queries = torch.randn(4, D)
    target = torch.full((4, 2), 0.5)
    loss = (decoder.reference_logits(queries).sigmoid() - target).pow(2).sum()
    loss.backward()
    assert decoder.reference_anchor.grad.abs().sum() > 0
    assert decoder.reference_point.layers[-1].weight.grad.abs().sum() > 0


def test_learned_references_have_no_anchor():
    layer = SMCADecoderLayer(d_model=D, nhead=HEADS, dim_feedforward=32, dropout=0.0)
    decoder = SMCADecoder(layer, 1, D)
    assert not hasattr(decoder, "reference_anchor")


def test_config_rejects_unknown_reference_mode():
    with pytest.raises(ConfigError, match="smca_reference"):
        ModelConfig(decoder="smca", smca_reference="random").validate()
