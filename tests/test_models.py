"""Model contract: finite outputs with padding, causality, save/load, builders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from raykd.core.losses import cross_entropy
from raykd.core.models import (
    Ensemble,
    GRURec,
    SASRec,
    build_model,
    count_bytes,
    count_params,
    left_pad,
    load_model,
    save_model,
)

FAMILIES = ["sasrec", "gru", "sasrec+pq", "gru+pq"]  # +pq: a product-quantised item table (core.item_tables)


def desc_for(family: str) -> dict:
    name, _, table = family.partition("+")
    desc = {"family": name, "num_items": 20, "dim": 8, "layers": 2, "heads": 2, "max_len": 10, "dropout": 0.2}
    return {**desc, "item_table": {"kind": "pq", "codes": 3, "codebook": 4}} if table else desc


def make(family: str) -> nn.Module:
    """The model of `family`; a PQ table gets seeded random codes (all-zero codes make every item alike)."""
    model = build_model(desc_for(family))
    if "+pq" in family:
        model.item_emb.set_codes(np.random.default_rng(1).integers(0, 4, (20, 3)))
    return model


def padded_batch() -> torch.Tensor:
    # One real item after 9 pads, an all-pad row, a full row, a half row.
    return torch.tensor(
        [
            [0] * 9 + [7],
            [0] * 10,
            list(range(1, 11)),
            [0] * 5 + [3, 4, 5, 6, 7],
        ]
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train", [True, False])
def test_padding_gives_finite_outputs_and_grads(family, train):
    torch.manual_seed(0)
    model = make(family).train(train)
    seq = padded_batch()
    hidden = model(seq)
    assert hidden.shape == (4, 10, 8) and torch.isfinite(hidden).all()
    logits = model.score(hidden)
    assert logits.shape == (4, 10, 21) and torch.isfinite(logits).all()
    assert torch.isfinite(model.last_scores(seq)).all()
    # Next-item targets: shift left; pad positions predict nothing (target 0).
    targets = torch.cat([seq[:, 1:], torch.tensor([[5], [0], [11], [8]])], 1) * (seq != 0)
    loss = cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_column_is_most_negative_finite(family):
    model = make(family)
    scores = model.last_scores(padded_batch())
    assert (scores[:, 0] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_amount_of_padding_does_not_change_scores(family):
    model = make(family).eval()
    short = model.last_scores(torch.tensor([[5, 6, 7]]))
    long = model.last_scores(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 5, 6, 7]]))
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_long_inputs_keep_the_last_max_len(family):
    model = make(family).eval()
    seq = torch.arange(1, 16).unsqueeze(0)  # 15 items, max_len 10
    torch.testing.assert_close(model.last_scores(seq), model.last_scores(seq[:, -10:]))


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_later_items_do_not_change_earlier_positions(family):
    model = make(family).eval()
    a = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    b = a.clone()
    b[0, -1] = 19
    torch.testing.assert_close(model(a)[:, :-1], model(b)[:, :-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(tmp_path, family):
    torch.manual_seed(0)
    model = make(family)
    save_model(tmp_path / family, model, desc_for(family), extra={"epoch": 3})
    loaded, desc = load_model(tmp_path / family)
    assert not loaded.training
    model.eval()
    seq = padded_batch()
    assert torch.equal(model.last_scores(seq), loaded.last_scores(seq))
    meta = json.loads((tmp_path / family / "model.json").read_text())
    assert meta == desc and meta["params"] == count_params(model) and meta["epoch"] == 3
    assert meta["family"] == family.partition("+")[0]


def test_save_unwraps_ddp_style_wrapper(tmp_path):
    class Wrapper(nn.Module):  # stands in for DistributedDataParallel, which keeps `.module`
        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module

    model = build_model(desc_for("sasrec")).eval()
    save_model(tmp_path, Wrapper(model), desc_for("sasrec"))
    loaded, _ = load_model(tmp_path)
    seq = padded_batch()
    assert torch.equal(model.last_scores(seq), loaded.last_scores(seq))


def test_param_counts_by_hand():
    # GRURec(V=9, dim=4, 1 layer): item table 10·4 = 40; GRU 3 gates · (4·4 + 4·4 + 4 + 4) = 120;
    # final LayerNorm 4 + 4 = 8. Total 168.
    assert count_params(GRURec(9, 4, 1, 1, 5, 0.0)) == 168
    # SASRec(V=9, dim=4, 1 block, max_len 5): items 40, positions 5·4 = 20;
    # block: LN 8 + qkv (4·12 + 12) 60 + out (16 + 4) 20 + LN 8 + FFN 2·(16 + 4) 40 = 136;
    # final LN 8. Total 40 + 20 + 136 + 8 = 204 (output scores are tied to the item table).
    assert count_params(SASRec(9, 4, 1, 2, 5, 0.0)) == 204


def test_size_counts_what_inference_reads():
    # SASRec(V=9, dim 4, 1 block) as above: 204 elements, all float32: 816 bytes.
    assert (count_params(SASRec(9, 4, 1, 2, 5, 0.0)), count_bytes(SASRec(9, 4, 1, 2, 5, 0.0))) == (204, 816)
    # The same with a PQ table of 2 codes over 256-row codebooks: the item table's 40 floats become
    # codebooks 256·4 = 1024 floats + codes 10·2 = 20 uint8 (a buffer, counted): 164 + 1024 + 20 = 1208
    # elements, (164 + 1024)·4 + 20·1 = 4772 bytes.
    pq = SASRec(9, 4, 1, 2, 5, 0.0, item_table={"kind": "pq", "codes": 2, "codebook": 256})
    assert (count_params(pq), count_bytes(pq)) == (1208, 4772)
    # A text teacher (3-dim text buffer 10·3, projection 3·4) is served folded into one 10·4 table:
    # the same 204 elements as the id-only model, not 204 + 30 + 12.
    text = SASRec(9, 4, 1, 2, 5, 0.0, text_dim=3)
    assert (count_params(text), count_bytes(text)) == (204, 816)
    # An ensemble is its members together.
    assert count_params(Ensemble([text, pq])) == 204 + 1208


def test_build_model_errors():
    with pytest.raises(ValueError, match="sasrec, gru"):
        build_model({**desc_for("sasrec"), "family": "bert"})
    with pytest.raises(ValueError, match="max_len"):
        build_model({k: v for k, v in desc_for("gru").items() if k != "max_len"})
    with pytest.raises(ValueError, match="divisible"):
        build_model({**desc_for("sasrec"), "heads": 3})


def test_left_pad_by_hand():
    out = left_pad([np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([], dtype=np.int64)], 3)
    assert out.dtype == torch.long
    assert out.tolist() == [[3, 4, 5], [0, 0, 7], [0, 0, 0]]


def test_ensemble_is_the_mean_log_probability_of_its_members():
    from raykd.core.models import Ensemble

    desc = {"family": "sasrec", "num_items": 12, "dim": 8, "layers": 1, "heads": 1, "max_len": 6, "dropout": 0.0}
    torch.manual_seed(0)
    a, b = build_model(desc).eval(), build_model(desc).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6]])
    with torch.no_grad():
        got = Ensemble([a, b]).last_scores(seq)
        la, lb = a.last_scores(seq).log_softmax(-1), b.last_scores(seq).log_softmax(-1)
    assert torch.allclose(got[:, 1:], (la[:, 1:] + lb[:, 1:]) / 2, atol=1e-6)
    assert got[0, 0] == torch.finfo(torch.float32).min
