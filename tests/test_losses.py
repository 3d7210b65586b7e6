"""Losses against hand-computed values (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from raykd.core.losses import (
    cross_entropy,
    distill_loss,
    kd_kl,
    kd_kl_full,
    kd_rank,
    rank_weights,
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


def test_student_rest_log_mass_matches_a_masked_sum_and_its_gradient():
    # r_s − logsumexp(s) comes from the log-softmax cross-entropy also uses: log(1 − the top-K's share).
    # Check value and gradient against the plain masked sum, with a duplicated index, an unusable
    # entry, and a row whose top-K holds all but ~1e-9 of the mass (summed exactly instead).
    from raykd.core.losses import student_rest_log_mass

    torch.manual_seed(0)
    s = torch.randn(4, 30, dtype=torch.float32)
    s[:, 0] = PAD
    idx = torch.randint(1, 30, (4, 5))
    idx[1, 3] = idx[1, 1]  # a duplicate counts once
    usable = torch.ones(4, 5, dtype=torch.bool)
    usable[2, 0] = False  # an unusable entry stays in the rest
    idx[3] = torch.arange(1, 6)
    s[3, 6:] = -20.0  # the rest of row 3 holds ~1e-9 of its mass
    a = s.clone().requires_grad_(True)
    b = s.clone().double().requires_grad_(True)
    taken = torch.zeros(4, 30, dtype=torch.bool).scatter_(1, torch.where(usable, idx, 0), True)
    taken[:, 0] = True
    expected = torch.where(taken, float("-inf"), b).logsumexp(1) - b.logsumexp(1)
    got = student_rest_log_mass(a.log_softmax(1), idx, usable)
    assert torch.allclose(got.double(), expected, atol=1e-5), (got, expected)
    w = torch.tensor([0.3, -1.0, 2.0, 0.7])
    (got * w).sum().backward()
    (expected * w.double()).sum().backward()
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-5)


def test_kd_kl_full_without_rest_is_top_k_kl():
    s = torch.tensor([[PAD, 0.3, -1.0, 2.0, 0.5]])
    idx, logits = torch.tensor([[3, 1]]), torch.tensor([[1.5, 0.2]])
    full = kd_kl_full(s, idx, logits, torch.tensor([float("nan")]), 2.0)
    assert full.item() == pytest.approx(kd_kl(s, idx, logits, 2.0).item(), abs=1e-6)


def test_distill_loss_kl_full_needs_rest():
    with pytest.raises(ValueError, match="rest"):
        distill_loss(three_items(), torch.tensor([2]), torch.tensor([[3, 2]]), torch.tensor([[1.0, 0.0]]),
                     0.5, 1.0, "kl_full")

