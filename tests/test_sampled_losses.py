"""Sampled-softmax losses (raykd.core.sampled_losses) against the full-softmax losses they estimate."""

from __future__ import annotations

import math

import pytest
import torch

from raykd.core.losses import cross_entropy, distill_loss
from raykd.core.sampled_losses import (
    row_sampled_softmax_loss,
    sampled_distill_loss,
    sampled_softmax_loss,
    stratified_logits,
)

PAD = torch.finfo(torch.float32).min


def full_ce(hidden: torch.Tensor, emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ emb.T
    logits[:, 0] = PAD
    return cross_entropy(logits, targets)


def test_sampled_softmax_covering_catalogue_is_full_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    hidden, emb = torch.randn(6, 4, generator=gen), torch.randn(9, 4, generator=gen)  # V = 8
    targets = torch.tensor([1, 8, 0, 3, 3, 5])
    expected = full_ce(hidden, emb, targets)
    for log_q in (torch.zeros(9), torch.randn(9, generator=gen)):  # n >= V ignores log_q
        got = sampled_softmax_loss(hidden, emb, targets, num_negatives=8, log_q=log_q)
        assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_sampled_softmax_masks_accidental_hits():
    # q puts (almost) all mass on item 1, so every negative is item 1 = the target: all masked,
    # leaving the positive alone: loss = -o + log(exp(o)) = 0.
    hidden, emb = torch.randn(1, 4), torch.randn(5, 4)
    log_q = torch.tensor([0.0, 0.0, -1e4, -1e4, -1e4])
    loss = sampled_softmax_loss(hidden, emb, torch.tensor([1]), num_negatives=3, log_q=log_q)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_sampled_softmax_trains_a_toy_problem():
    # Learn to predict item (u mod 20) + 1 for 40 users with 5 sampled negatives out of 20.
    gen = torch.Generator().manual_seed(0)
    users = torch.nn.Embedding(40, 8)
    items = torch.nn.Embedding(21, 8)
    targets = torch.arange(40) % 20 + 1
    opt = torch.optim.Adam([*users.parameters(), *items.parameters()], lr=0.05)
    log_q = torch.zeros(21)
    losses = []
    for _ in range(60):
        loss = sampled_softmax_loss(users.weight, items.weight, targets, 5, log_q, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert full_ce(users.weight, items.weight, targets).item() < math.log(20)


# ---------------------------------------------------------------- sampled softmax with a KD term


def _score(hidden, items):
    """What the models' `score` computes: every item's logit, the padding column pinned to PAD."""
    return torch.cat([torch.full((len(hidden), 1), PAD), hidden @ items[1:].T], 1)


def kd_batch(n=6, v=40, d=5, k=4, seed=0):
    """hidden, item table, targets (one padding row), teacher top-K (one unusable entry) and rest.
    Logits s = h · e have a standard deviation of about 1, as a trained student's do."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 0.67).requires_grad_()
    items = (torch.randn(v + 1, d, generator=g) * 0.67).requires_grad_()
    targets = torch.randint(1, v + 1, (n,), generator=g)
    targets[2] = 0
    idx = torch.stack([torch.randperm(v, generator=g)[:k] + 1 for _ in range(n)])
    logits = torch.randn(n, k, generator=g) * 2
    idx[1, -1], logits[3, 0] = 0, float("-inf")  # a padding entry and a non-finite logit: unusable
    rest = torch.randn(n, generator=g)
    return hidden, items, targets, idx, logits, rest


@pytest.mark.parametrize("kind", ["kl", "kl_full", "rank"])
def test_sampled_kd_covering_the_catalogue_is_the_full_softmax_loss(kind):
    # n >= V for every row: the same value and gradients as distill_loss on the full logits
    hidden, items, targets, idx, logits, rest = kd_batch()
    full = distill_loss(_score(hidden, items), targets, idx, logits, 0.4, 2.0, kind, top_m=3, teacher_rest=rest)
    grads_full = torch.autograd.grad(full[0], [hidden, items])
    sampled = sampled_distill_loss(hidden, items, targets, idx, logits, 0.4, 2.0, kind, 8, torch.zeros(41),
                                   top_m=3, teacher_rest=rest, row_negatives=40)
    grads = torch.autograd.grad(sampled[0], [hidden, items])
    for a, b in zip([*full, *grads_full], [*sampled, *grads]):
        assert torch.allclose(a, b, atol=1e-5), kind


@pytest.mark.parametrize("kind", ["kl", "kl_full", "rank"])
def test_sampled_kd_averages_to_the_full_softmax_loss(kind):
    # per-row samples over a 300-item catalogue: the mean over draws is close to the exact loss
    hidden, items, targets, idx, logits, rest = kd_batch(n=40, v=300, k=10)
    exact = distill_loss(_score(hidden, items), targets, idx, logits, 0.5, 1.5, kind, top_m=3, teacher_rest=rest)
    g = torch.Generator().manual_seed(0)
    draws = [sampled_distill_loss(hidden, items, targets, idx, logits, 0.5, 1.5, kind, 8, torch.linspace(-1, 1, 301),
                                  top_m=3, teacher_rest=rest, generator=g, row_negatives=30)[0] for _ in range(200)]
    assert float(torch.stack(draws).detach().mean()) == pytest.approx(float(exact[0].detach()), rel=0.02)


def test_sampled_kd_with_alpha_zero_is_the_sampled_softmax():
    hidden, items, targets, *_ = kd_batch()
    log_q = torch.randn(41)
    total, ce, kd = sampled_distill_loss(hidden, items, targets, None, None, 0.0, 1.0, "kl", 8, log_q,
                                         generator=torch.Generator().manual_seed(3))
    plain = sampled_softmax_loss(hidden, items, targets, 8, log_q, torch.Generator().manual_seed(3))
    assert torch.equal(total, plain) and torch.equal(ce, plain) and kd.item() == 0.0


def test_stratified_rest_mass_is_unbiased():
    # exp(log M) estimates the student's mass outside the usable top-K (target exact, the rest sampled)
    hidden, items, targets, idx, logits, _ = kd_batch(v=200, k=10)
    targets[2] = idx[2, 0]  # one target inside its row's top-K
    h, e = hidden.detach(), items.detach()
    s = _score(h, e)
    usable = (idx != 0) & torch.isfinite(logits)
    taken = torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, usable)
    taken[:, 0] = True
    truth = s.masked_fill(taken, float("-inf")).exp().sum(1)
    log_q = torch.linspace(-2, 2, 201)  # sampling far from uniform: the correction must do the work
    g = torch.Generator().manual_seed(0)
    draws = [stratified_logits(h, e, targets, idx, usable, 20, log_q, g)[2].exp() for _ in range(2000)]
    assert torch.allclose(torch.stack(draws).mean(0), truth, rtol=0.05)
    s_k, s_y, _, has = stratified_logits(h, e, targets, idx, usable, 20, log_q, g)
    assert torch.allclose(s_k[usable], s.gather(1, idx)[usable]) and torch.allclose(s_y, s.gather(1, targets.unsqueeze(1))[:, 0])
    assert has.all()


@pytest.mark.parametrize("kind", ["kl", "kl_full", "rank"])
def test_sampled_kd_is_finite_and_skips_padding_rows(kind):
    hidden, items, targets, idx, logits, rest = kd_batch(v=300)
    g = torch.Generator().manual_seed(1)
    total, _, kd = sampled_distill_loss(hidden, items, targets, idx, logits, 0.5, 1.5, kind, 30, torch.zeros(301),
                                         teacher_rest=rest, generator=g, row_negatives=20)
    total.backward()
    assert torch.isfinite(total) and kd.item() > 0
    assert torch.isfinite(hidden.grad).all() and hidden.grad[2].abs().sum() == 0  # row 2 is padding
    assert torch.isfinite(items.grad).all()


def test_sampled_kd_all_padding_and_bad_arguments():
    hidden, items, _, idx, logits, _ = kd_batch()
    total, _, _ = sampled_distill_loss(hidden, items, torch.zeros(6, dtype=torch.long), idx, logits, 0.5, 1.0,
                                       "kl", 10, torch.zeros(41))
    total.backward()
    assert total.item() == 0.0 and torch.isfinite(hidden.grad).all()
    targets = torch.ones(6, dtype=torch.long)
    with pytest.raises(ValueError, match="needs teacher_idx"):
        sampled_distill_loss(hidden, items, targets, None, None, 0.5, 1.0, "kl", 10, torch.zeros(41))
    with pytest.raises(ValueError, match="rest log-mass"):
        sampled_distill_loss(hidden, items, targets, idx, logits, 0.5, 1.0, "kl_full", 10, torch.zeros(41))
    with pytest.raises(ValueError, match="unknown distillation loss"):
        sampled_distill_loss(hidden, items, targets, idx, logits, 0.5, 1.0, "mse", 10, torch.zeros(41))


def test_row_sampled_softmax_is_cross_entropy_when_the_catalogue_is_sampled_densely():
    """Per-row negatives (a no-KD twin's hard loss under `loss: sampled`): with uniform q over 50
    items and 20,000 draws per row, the estimated log-partition is the exact one to ~1e-2."""
    torch.manual_seed(0)
    hidden, items = torch.randn(32, 8), torch.randn(51, 8)
    targets = torch.randint(1, 51, (32,))
    targets[3] = 0  # padding rows are ignored
    real = targets != 0
    full = torch.nn.functional.cross_entropy(hidden[real] @ items[1:].T, targets[real] - 1)
    est = row_sampled_softmax_loss(hidden, items, targets, 20000, torch.zeros(51),
                                   torch.Generator().manual_seed(0))
    assert float(est) == pytest.approx(float(full), abs=0.02)
    # one item only: the target's own logit is the whole partition (every draw is a masked hit)
    one = row_sampled_softmax_loss(hidden[:2], items[:2], torch.tensor([1, 1]), 5, torch.zeros(2))
    assert float(one) == pytest.approx(0.0, abs=1e-6)


def test_a_no_kd_student_trains_on_per_row_negatives_a_teacher_on_shared_ones():
    from raykd.config import ModelConfig, TrainConfig
    from raykd.core import models
    from raykd.training import loop
    from raykd.training.spec import RunSpec

    train = TrainConfig(loss="sampled", num_negatives=7, kd_negatives=5)
    core = models.build_model({"family": "sasrec", "num_items": 30, "dim": 8, "layers": 1, "heads": 1,
                               "max_len": 5, "dropout": 0.0})
    hidden, targets, log_q = torch.randn(6, 8), torch.randint(1, 31, (6,)), torch.zeros(31)
    none = (None, None, None)
    twin = loop.make_loss(RunSpec("student_nokd", ModelConfig(), train, 0), log_q)
    teacher = loop.make_loss(RunSpec("teacher", ModelConfig(), train, 0), log_q)
    for loss, reference in ((twin, lambda: row_sampled_softmax_loss(hidden, core.item_table(), targets, 5, log_q)),
                            (teacher, lambda: sampled_softmax_loss(hidden, core.item_table(), targets, 7, log_q))):
        torch.manual_seed(1)
        got = loss(hidden, core, targets, none)
        torch.manual_seed(1)
        assert torch.equal(got, reference())
    torch.manual_seed(1)
    other = twin(hidden, core, targets, none)
    torch.manual_seed(1)
    assert not torch.equal(other, sampled_softmax_loss(hidden, core.item_table(), targets, 7, log_q))
