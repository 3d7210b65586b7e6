"""Losses against hand-computed values (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from raykd.losses import (
    cross_entropy,
    distill_loss,
    kd_kl,
    kd_kl_full,
    kd_rank,
    rank_weights,
    row_sampled_softmax_loss,
    sampled_distill_loss,
    sampled_softmax_loss,
    stratified_logits,
)

PAD = torch.finfo(torch.float32).min
LN2, LN5 = math.log(2.0), math.log(5.0)


def three_items() -> torch.Tensor:
    # Columns: pad, item 1, item 2, item 3. exp(logits) of the items = 1, 2, 5; sum 8.
    return torch.tensor([[PAD, 0.0, LN2, LN5]])


def test_cross_entropy_three_items_by_hand():
    # Target item 2: CE = -log(2 / 8) = log 4. The padding column adds exp(PAD) = 0.
    assert cross_entropy(three_items(), torch.tensor([2])).item() == pytest.approx(math.log(4), abs=1e-6)


def test_cross_entropy_ignores_padding_rows():
    # Row 2 has target 0 (padding): the mean is over row 1 only, so still log 4.
    logits = torch.cat([three_items(), torch.tensor([[PAD, 9.0, -9.0, 0.0]])])
    assert cross_entropy(logits, torch.tensor([2, 0])).item() == pytest.approx(math.log(4), abs=1e-6)


def test_all_padding_batch_gives_zero_loss_with_finite_grad():
    logits = three_items().repeat(2, 1).requires_grad_()
    targets = torch.tensor([0, 0])
    total, ce, kd = distill_loss(logits, targets, torch.tensor([[1, 2]] * 2), torch.zeros(2, 2), 0.5, 2.0)
    total.backward()
    assert total.item() == 0.0 and ce.item() == 0.0 and kd.item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_alpha_zero_is_plain_cross_entropy_without_teacher():
    logits = torch.randn(5, 7)
    targets = torch.tensor([1, 2, 0, 6, 3])
    total, ce, kd = distill_loss(logits, targets, None, None, alpha=0.0, temperature=3.0)
    assert torch.equal(total, cross_entropy(logits, targets))
    assert torch.equal(total, ce) and kd.item() == 0.0


def test_identical_teacher_and_student_give_zero_kl():
    # Student logits at the teacher's K items equal the teacher logits (exact in float16).
    student = torch.tensor([[PAD, 0.5, 1.0, -2.0, 3.0]])
    idx = torch.tensor([[4, 2, 1]])
    teacher = torch.tensor([[3.0, 1.0, 0.5]], dtype=torch.float16)
    for t in (0.5, 1.0, 4.0):
        assert kd_kl(student, idx, teacher, t).item() == 0.0


def test_kl_two_items_temperature_squared():
    # Teacher logits (0, 2), student (0, 0), T = 2:
    # p = softmax(0, 1) = (1/(1+e), e/(1+e)) = (0.268941, 0.731059); q = (1/2, 1/2)
    # KL(p‖q) = p1·log(2 p1) + p2·log(2 p2) = 0.268941·(-0.620115) + 0.731059·0.379885
    #         = -0.166774 + 0.277719 = 0.110944
    # kd_kl = T² · KL = 4 · 0.110944 = 0.443776
    p1 = 1 / (1 + math.e)
    p2 = 1 - p1
    raw_kl = p1 * math.log(2 * p1) + p2 * math.log(2 * p2)
    assert raw_kl == pytest.approx(0.110944, abs=1e-6)
    student = torch.tensor([[PAD, 0.0, 0.0]])
    loss = kd_kl(student, torch.tensor([[1, 2]]), torch.tensor([[0.0, 2.0]]), temperature=2.0)
    assert loss.item() == pytest.approx(0.443776, abs=1e-6)


def test_kl_ignores_padding_item_and_stays_finite_at_low_temperature():
    # The teacher entry at item 0 is dropped: the result equals the 2-item example at T = 2.
    student = torch.tensor([[PAD, 0.0, 0.0]], requires_grad=True)
    idx, teacher = torch.tensor([[0, 1, 2]]), torch.tensor([[9.0, 0.0, 2.0]])
    p1 = 1 / (1 + math.e)
    expected = 4 * (p1 * math.log(2 * p1) + (1 - p1) * math.log(2 * (1 - p1)))
    assert kd_kl(student, idx, teacher, 2.0).item() == pytest.approx(expected, abs=1e-6)
    # T = 0.5 turns the padding logit into -inf after division; nothing may become NaN.
    loss = kd_kl(student, idx, teacher, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_rank_weights_by_hand():
    # m = 3, T = 1: exp(0), exp(-1), exp(-2) = 1, 0.367879, 0.135335; sum 1.503215
    w = rank_weights(3, 1.0)
    assert w.tolist() == pytest.approx([0.665241, 0.244728, 0.090031], abs=1e-6)


def test_kd_rank_by_hand():
    # Teacher's top-2 (m = 2, T = 1): item 2 then item 1. w = (e/(1+e), 1/(1+e)).
    # Student log-softmax over items (1, 2, 5)/8: log p(2) = log(2/8), log p(1) = log(1/8).
    # loss = w0·log 4 + w1·log 8 = 0.731059·1.386294 + 0.268941·2.079442
    #      = 1.013462 + 0.559248 = 1.572710
    w0, w1 = math.e / (1 + math.e), 1 / (1 + math.e)
    expected = w0 * math.log(4) + w1 * math.log(8)
    assert expected == pytest.approx(1.572710, abs=1e-6)
    sorted_idx, sorted_t = torch.tensor([[2, 1, 3]]), torch.tensor([[3.0, 2.0, 1.0]])
    assert kd_rank(three_items(), sorted_idx, sorted_t, 1.0, top_m=2).item() == pytest.approx(expected, abs=1e-6)
    # Unsorted teacher_idx and a padding entry change nothing: order comes from the logits.
    messy_idx, messy_t = torch.tensor([[1, 0, 3, 2]]), torch.tensor([[2.0, 9.0, 1.0, 3.0]])
    assert kd_rank(three_items(), messy_idx, messy_t, 1.0, top_m=2).item() == pytest.approx(expected, abs=1e-6)


def test_distill_loss_mixes_terms_and_skips_padding_rows():
    logits = torch.cat([three_items(), torch.tensor([[PAD, 5.0, -1.0, 2.0]])])
    targets = torch.tensor([2, 0])  # row 2 is padding: excluded from CE and KD alike
    idx = torch.tensor([[1, 2], [3, 1]])
    teacher = torch.tensor([[0.0, 2.0], [1.0, 7.0]])
    total, ce, kd = distill_loss(logits, targets, idx, teacher, alpha=0.25, temperature=2.0)
    # Row 1: CE = log 4; student at (1, 2) = (0, log 2); KD from the teacher (0, 2) at T = 2.
    expected_kd = kd_kl(three_items(), idx[:1], teacher[:1], 2.0)
    assert ce.item() == pytest.approx(math.log(4), abs=1e-6)
    assert kd.item() == pytest.approx(expected_kd.item(), abs=1e-6)
    assert total.item() == pytest.approx(0.75 * math.log(4) + 0.25 * expected_kd.item(), abs=1e-6)


def test_distill_loss_rejects_bad_arguments():
    logits, targets = three_items(), torch.tensor([1])
    with pytest.raises(ValueError, match="kl, kl_full, rank"):
        distill_loss(logits, targets, None, None, 0.0, 1.0, kind="mse")
    with pytest.raises(ValueError, match="teacher"):
        distill_loss(logits, targets, None, None, 0.5, 1.0)


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


def test_kd_kl_full_two_plus_rest_bins_by_hand():
    # Student items 1..3 with exp = 1, 2, 5 (sum 8). Teacher top-2 = items 3, 2 with logits ln 5, ln 2
    # and rest (item 1) log-mass ln 1 = 0: teacher bins (5, 2, 1)/8, student bins (5, 2, 1)/8 -> KL 0.
    s = three_items()
    idx, logits = torch.tensor([[3, 2]]), torch.tensor([[LN5, LN2]])
    zero = kd_kl_full(s, idx, logits, torch.tensor([0.0]), 1.0)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    # Teacher puts rest mass e^ln5 = 5 on item 1: bins (5, 2, 5)/12 against the student's (5, 2, 1)/8.
    p = torch.tensor([5 / 12, 2 / 12, 5 / 12])
    q = torch.tensor([5 / 8, 2 / 8, 1 / 8])
    expected = float((p * (p / q).log()).sum())
    got = kd_kl_full(s, idx, logits, torch.tensor([LN5]), 1.0)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_kd_kl_full_pushes_down_items_outside_the_teacher_top_k():
    # Top-K KL is blind to the rest: raising item 1 (not in the teacher's top-2) changes nothing
    # for kd_kl but raises kd_kl_full, whose gradient on item 1 is positive (push it down).
    idx, logits, rest = torch.tensor([[3, 2]]), torch.tensor([[LN5, LN2]]), torch.tensor([0.0])
    s = torch.tensor([[PAD, 3.0, LN2, LN5]], requires_grad=True)
    assert kd_kl(s, idx, logits, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    loss = kd_kl_full(s, idx, logits, rest, 1.0)
    loss.backward()
    assert loss.item() > 0.01 and s.grad[0, 1] > 0


def test_kd_kl_full_without_rest_is_top_k_kl():
    s = torch.tensor([[PAD, 0.3, -1.0, 2.0, 0.5]])
    idx, logits = torch.tensor([[3, 1]]), torch.tensor([[1.5, 0.2]])
    full = kd_kl_full(s, idx, logits, torch.tensor([float("nan")]), 2.0)
    assert full.item() == pytest.approx(kd_kl(s, idx, logits, 2.0).item(), abs=1e-6)


def test_distill_loss_kl_full_needs_rest():
    with pytest.raises(ValueError, match="rest"):
        distill_loss(three_items(), torch.tensor([2]), torch.tensor([[3, 2]]), torch.tensor([[1.0, 0.0]]),
                     0.5, 1.0, "kl_full")


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


def test_a_no_kd_student_trains_on_per_row_negatives_a_teacher_on_shared_ones(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raykd.config import ModelConfig, TrainConfig
    from raykd.spec import RunSpec, loop_config

    data = tmp_path / "data"
    data.mkdir()
    (data / "stats.json").write_text(json.dumps({"items": 2}))
    pq.write_table(pa.table({"index": [1, 2], "count": [3, 4]}), data / "items.parquet")
    train = TrainConfig(loss="sampled")
    twin = loop_config(RunSpec("student_nokd", ModelConfig(), train), data)
    teacher = loop_config(RunSpec("teacher", ModelConfig(), train), data)
    assert twin["row_negatives"] and not teacher["row_negatives"]
