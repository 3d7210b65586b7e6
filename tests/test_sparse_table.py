"""Sparse item-table updates (train.sparse_table): a step touches only the rows it used (issue 23.3)."""

from __future__ import annotations

import copy

import pytest
import torch

from raykd.config import ModelConfig, TrainConfig
from raykd.core import models, sampled_losses
from raykd.training import loop
from raykd.training.spec import RunSpec

V, D = 50, 8


def _model(sparse: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.SASRec(num_items=V, dim=D, layers=1, heads=1, max_len=6, dropout=0.0)
    model.item_emb.sparse = sparse
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    inp = torch.randint(1, 10, (4, 6), generator=g)  # histories use items 1..9 only
    target = torch.randint(1, 10, (4, 6), generator=g)
    return inp, target


def _step(model, optimizer, loss_fn, seed=7):
    inp, target = _batch()
    mask = target > 0
    torch.manual_seed(seed)  # the same negatives for both runs
    loss = loss_fn(model(inp)[mask], model, target[mask], (None, None, None))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad = model.item_emb.weight.grad
    optimizer.step()
    return loss.detach(), grad


@pytest.mark.parametrize("role", ["teacher", "student"])  # shared negatives; per-row negatives
def test_a_sparse_step_moves_only_the_rows_it_used_and_equals_adam_on_them(role):
    spec = RunSpec(role, ModelConfig(dim=D, layers=1, heads=1, max_len=6),
                   TrainConfig(loss="sampled", num_negatives=5, kd_negatives=3, lr=0.01), seed=0)
    log_q = torch.zeros(V + 1)
    dense, sparse = _model(False), _model(True)
    before = dense.item_emb.weight.detach().clone()
    d_loss, d_grad = _step(dense, loop.make_optimizer(dense, spec.train, 1), loop.make_loss(spec, log_q))
    s_opt = loop.make_optimizer(sparse, spec.train, 1)
    assert isinstance(s_opt, loop.TableAndRest)
    s_loss, s_grad = _step(sparse, s_opt, loop.make_loss(spec, log_q, sparse=True))
    assert s_grad.is_sparse and not d_grad.is_sparse
    assert torch.allclose(s_loss, d_loss) and torch.allclose(s_grad.to_dense(), d_grad, atol=1e-7)
    used = s_grad.coalesce().indices()[0].unique()
    moved = (sparse.item_emb.weight.detach() != before).any(1).nonzero().squeeze(1)
    assert set(moved.tolist()) <= set(used.tolist()) and len(used) < V  # the rest stayed put
    # Adam's first step on a used row moves it the same way, sparse or dense (SparseAdam adds eps
    # after the bias correction, so a gradient near eps moves a little less; the sign is the same)
    s_upd = (sparse.item_emb.weight.detach() - before)[used]
    d_upd = (dense.item_emb.weight.detach() - before)[used]
    big = d_grad[used].abs() > 1e-4
    assert torch.equal(s_upd.sign(), d_upd.sign()) and torch.allclose(s_upd[big], d_upd[big], rtol=0.01)
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        if name != "item_emb.weight":  # every other parameter: the same Adam
            assert torch.allclose(a, b, atol=1e-6), name


def test_the_table_and_rest_state_reloads_into_the_same_next_step():
    spec = TrainConfig(loss="sampled", num_negatives=5, lr=0.01, weight_decay=0.1)
    loss = loop.make_loss(RunSpec("teacher", ModelConfig(dim=D), spec, seed=0), torch.zeros(V + 1), sparse=True)
    a = _model(True)
    opt_a = loop.make_optimizer(a, spec, 1)
    _step(a, opt_a, loss)
    b = _model(True, seed=3)
    b.load_state_dict(a.state_dict())
    opt_b = loop.make_optimizer(b, spec, 1)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a file: no tensors shared with a
    state = opt_a.state_dict()["state"]
    assert opt_a.table_index in state and len(state) == len(list(a.parameters()))  # one Adam's numbering
    _step(a, opt_a, loss, seed=8)
    _step(b, opt_b, loss, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_an_all_padding_batch_gives_a_sparse_zero():
    table = torch.nn.Parameter(torch.randn(V + 1, D))
    hidden = torch.randn(3, D, requires_grad=True)
    out = sampled_losses.sampled_softmax_loss(hidden, table, torch.zeros(3, dtype=torch.long), 5,
                                              torch.zeros(V + 1), sparse=True)
    out.backward()
    assert out.item() == 0.0 and table.grad.is_sparse and table.grad.coalesce().values().numel() == 0


def test_sparse_only_where_it_applies():
    desc = {"num_items": V}

    def on(train: TrainConfig, **extra) -> bool:
        return loop.sparse_table(RunSpec("teacher", ModelConfig(dim=D), train, seed=0), {**desc, **extra})

    sampled = TrainConfig(loss="sampled")
    assert on(sampled)
    assert not on(TrainConfig(loss="full"))  # the full softmax reads every row
    assert not on(TrainConfig(loss="auto"))  # a small catalogue: auto is the full softmax
    assert not on(TrainConfig(loss="sampled", sparse_table=False))
    assert not on(TrainConfig(loss="sampled", use_gpu=True))  # NCCL has no sparse all-reduce
    assert not on(sampled, item_table={"kind": "pq", "codes": 2})
    assert not on(sampled, text_dim=16)


@pytest.mark.parametrize("kind", ["kl", "kl_full", "rank"])
def test_the_sampled_kd_loss_gives_the_same_value_and_rows_sparse_or_dense(kind):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, D, generator=g)
    targets = torch.tensor([3, 0, 7, 9, 1, 4])
    t_idx = torch.randint(1, V + 1, (6, 5), generator=g)
    t_logits = torch.randn(6, 5, generator=g).sort(1, descending=True).values
    rest = torch.randn(6, generator=g)
    grads, values = [], []
    for sparse in (False, True):
        table = torch.nn.Parameter(torch.randn(V + 1, D, generator=torch.Generator().manual_seed(0)))
        torch.manual_seed(11)  # the same per-row draws
        total, _, _ = sampled_losses.sampled_distill_loss(hidden, table, targets, t_idx, t_logits, 0.5, 2.0, kind,
                                                          10, torch.zeros(V + 1), teacher_rest=rest, row_negatives=4,
                                                          sparse=sparse)
        total.backward()
        values.append(total.detach())
        grads.append(table.grad)
    assert torch.allclose(values[0], values[1]) and grads[1].is_sparse
    assert torch.allclose(grads[1].to_dense(), grads[0], atol=1e-7)
