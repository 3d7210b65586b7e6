"""Training losses over the whole catalogue: cross-entropy, top-K and whole-catalogue knowledge
distillation, ranking distillation. Their sampled-softmax versions are in `raykd.core.sampled_losses`.

Shapes: N rows (flattened training positions), V + 1 columns (item 0 is padding). A row whose
target is 0 is a padding position and is excluded from every loss; a batch with no real row gives
a zero loss that is still connected to the graph. Reductions are means over real rows. Every loss
is computed in float32, whatever the dtype of its inputs (teacher logits are stored as float16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("kl", "kl_full", "rank")


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    # Sum of empty slices: exactly 0, yet every input gets a (zero) gradient, which keeps DDP
    # from complaining about parameters that took no part in the step.
    return sum(t[:0].sum() for t in tensors)


def _masked_mean(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not mask.any():
        return _zero(per_row)
    return per_row[mask].mean()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over rows with a real target.

        CE = mean_{i: y_i != 0} [ -s_{i,y_i} + log Σ_j exp(s_{i,j}) ]

    logits [N, V+1] (column 0 may hold a huge negative value: it then adds exp(...) = 0),
    targets [N] long, 0 = padding (ignored).
    """
    if not (targets != 0).any():
        return _zero(logits)
    return F.cross_entropy(logits.float(), targets, ignore_index=0)


def _teacher_entries(teacher_idx: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """True where a teacher entry is usable: a real item (index != 0) with a finite logit."""
    return (teacher_idx != 0) & torch.isfinite(teacher_logits)


def kd_kl(
    student_logits: torch.Tensor,
    teacher_idx: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-K distillation: temperature-scaled KL from the teacher to the student (Hinton et al., 2015).

        p = softmax(t / T),  q = softmax(s_K / T),  s_K = s.gather(1, teacher_idx)
        KD = T² · mean_i Σ_k p_ik (log p_ik − log q_ik)

    Both softmaxes run over the same K teacher items only (the teacher's top-K is all that is
    stored). T² keeps gradient magnitudes comparable across temperatures. Teacher entries at the
    padding item or with a non-finite logit get p = 0 and leave the student's softmax too; rows
    with no usable entry, or with mask False, are excluded. Identical s_K and t give exactly 0.

    student_logits [N, V+1]; teacher_idx [N, K] long; teacher_logits [N, K] (any float dtype);
    mask [N] bool (e.g. targets != 0) or None for all rows.
    """
    usable = _teacher_entries(teacher_idx, teacher_logits)
    rows = usable.any(1) if mask is None else usable.any(1) & mask
    return _binned_kl(teacher_logits, student_logits.gather(1, teacher_idx), usable, temperature, rows)


def _binned_kl(t: torch.Tensor, s: torch.Tensor, ok: torch.Tensor, temperature: float,
               rows: torch.Tensor) -> torch.Tensor:
    """T² · mean over `rows` of KL(softmax(t / T) ‖ softmax(s / T)), both over the bins where `ok`."""
    # A huge finite fill, not -inf: an all-unusable row must still give finite softmax grads.
    fill = torch.tensor(torch.finfo(torch.float32).min, device=s.device)
    t = torch.where(ok, t.float() / temperature, fill)
    s = torch.where(ok, s.float() / temperature, fill)
    log_p, log_q = t.log_softmax(1), s.log_softmax(1)
    # Unusable entries have p = 0; zeroing their logs avoids 0 · (−inf) = NaN in value and grad.
    diff = torch.where(ok, log_p - log_q, torch.zeros_like(log_p))
    per_row = (log_p.exp() * diff).sum(1) * temperature**2
    return _masked_mean(per_row, rows)


def _kl_with_rest(s_k: torch.Tensor, r_s: torch.Tensor, usable: torch.Tensor, teacher_logits: torch.Tensor,
                  teacher_rest: torch.Tensor, rest_ok: torch.Tensor, temperature: float,
                  rows: torch.Tensor) -> torch.Tensor:
    """The (K+1)-bin KL of `kd_kl_full` from the student's top-K logits s_k and rest log-mass r_s."""
    ok = torch.cat([usable, rest_ok.unsqueeze(1)], 1)
    t = torch.cat([teacher_logits.float(), teacher_rest.float().unsqueeze(1)], 1)
    return _binned_kl(t, torch.cat([s_k.float(), r_s.unsqueeze(1)], 1), ok, temperature, rows)


def kd_kl_full(
    student_logits: torch.Tensor,
    teacher_idx: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_rest: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Whole-catalogue distillation: a (K+1)-bin KL over {the teacher's top-K items, all the rest}.

        r_t = log Σ_{j ∉ topK} exp(t_j)            (stored with the soft labels, at T = 1)
        r_s = log Σ_{j ∉ topK, j ≠ 0} exp(s_j)     (the student's mass outside the teacher's top-K)
        p = softmax([t_K, r_t] / T),  q = softmax([s_K, r_s] / T)
        KD = T² · mean_i Σ_{b ≤ K+1} p_ib (log p_ib − log q_ib)

    Unlike `kd_kl`, the student is also pushed down on every item outside the teacher's top-K
    (through r_s): items it ranks high and the teacher does not. At T = 1 this is exactly the KL
    between the teacher's and the student's full-catalogue distributions, coarsened to those K + 1
    bins. A row whose r_t is not finite (external scores without it) has an empty rest bin (p = 0)
    but keeps its K bins. Identical logits give 0 (to float precision).

    student_logits [N, V+1]; teacher_idx [N, K]; teacher_logits [N, K]; teacher_rest [N]; mask [N].
    """
    return _kl_full_from_log_probs(student_logits.float().log_softmax(1), teacher_idx, teacher_logits, teacher_rest,
                                   temperature, mask)


def _kl_full_from_log_probs(log_p: torch.Tensor, teacher_idx: torch.Tensor, teacher_logits: torch.Tensor,
                            teacher_rest: torch.Tensor, temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    """`kd_kl_full` on the student's log-softmax, which cross-entropy shares: the bins are
    [s_K, r_s] − logsumexp(s), the same softmax at any T (a shift common to every bin)."""
    usable = _teacher_entries(teacher_idx, teacher_logits)
    rows = usable.any(1) if mask is None else usable.any(1) & mask
    return _kl_with_rest(log_p.gather(1, teacher_idx), student_rest_log_mass(log_p, teacher_idx, usable), usable,
                         teacher_logits, teacher_rest, torch.isfinite(teacher_rest), temperature, rows)


EXACT_REST_BELOW = 1e-4  # a rest share under this is summed item by item (subtracting would lose digits)


def student_rest_log_mass(log_p: torch.Tensor, teacher_idx: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """r_s − logsumexp(s) = log Σ_j softmax(s)_j over the items j ≠ 0 outside the usable teacher entries [N].

    From the log-softmax `log_p` [N, V+1] as log(1 − the share of the top-K and the padding
    column), summed in float64: no second pass over the catalogue (with a masked logsumexp instead,
    `kl_full` + CE cost 3.5× CE alone on Beauty's shape; this way 2.1×, benchmarks/bench_losses.py).
    A row whose rest holds under EXACT_REST_BELOW of its mass is summed over its rest items
    instead. An item listed twice counts once.
    """
    idx = torch.where(usable, teacher_idx, torch.zeros_like(teacher_idx))
    order = idx.argsort(dim=1, stable=True)
    ranked = idx.gather(1, order)
    again = torch.zeros_like(usable).scatter_(1, order[:, 1:], ranked[:, 1:] == ranked[:, :-1])
    log_share = torch.where((idx != 0) & ~again, log_p.gather(1, idx), float("-inf"))
    rest = 1 - (log_share.double().exp().sum(1) + log_p[:, 0].double().exp())
    r_s = rest.clamp_min(EXACT_REST_BELOW).log().float()
    tight = (rest < EXACT_REST_BELOW).nonzero().squeeze(1)
    if len(tight):
        taken = torch.zeros_like(log_p[tight], dtype=torch.bool).scatter_(1, idx[tight], True)
        taken[:, 0] = True
        r_s = r_s.index_put((tight,), log_p[tight].masked_fill(taken, float("-inf")).logsumexp(1))
    return r_s


def rank_weights(m: int, temperature: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """w_r = exp(−r / T) / Σ_{r'<m} exp(−r' / T), r = 0..m−1: the teacher's first item weighs most."""
    return torch.softmax(-torch.arange(m, dtype=torch.float32, device=device) / temperature, 0)


def kd_rank(
    student_logits: torch.Tensor,
    teacher_idx: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    top_m: int = 10,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ranking distillation: the teacher's top-m items are weighted positives.

        KD = mean_i −Σ_{r<m} w_r · log softmax(s_i)[π_i(r)],  w_r ∝ exp(−r / T), Σ_r w_r = 1

    where π_i(r) is the teacher's r-th best item for row i. After Tang & Wang, "Ranking
    Distillation" (KDD 2018), who weight the teacher's top-m by rank with exp(−r/λ) and a
    pointwise sigmoid loss; this variant uses the student's full softmax over the catalogue (a
    listwise form, as in Kang et al., CIKM 2020 "DE-RRD"), which matches the CE scale. T only
    shapes the rank weights; the student logits are not tempered. The top-m is taken by teacher
    logit (stable to an unsorted teacher_idx); unusable entries (padding item, non-finite logit)
    get weight 0 and the remaining weights are renormalised.
    """
    order, ok, w = _rank_targets(teacher_idx, teacher_logits, temperature, top_m)
    rows = ok.any(1) if mask is None else ok.any(1) & mask
    s = student_logits.float()
    log_probs = s.gather(1, teacher_idx.gather(1, order)) - torch.logsumexp(s, 1, keepdim=True)
    return _rank_loss(log_probs, ok, w, rows)


def _rank_targets(teacher_idx: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  top_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, ok, w): positions of the teacher's top-m in teacher_idx, their usability, their weights."""
    usable = _teacher_entries(teacher_idx, teacher_logits)
    m = min(top_m, teacher_idx.shape[1])
    t = torch.where(usable, teacher_logits.float(), torch.tensor(float("-inf"), device=usable.device))
    order = t.topk(m, dim=1).indices  # sorted descending; ties in any order
    ok = usable.gather(1, order)
    w = rank_weights(m, temperature, device=ok.device) * ok
    return order, ok, w / w.sum(1, keepdim=True).clamp(min=1e-12)


def _rank_loss(log_probs: torch.Tensor, ok: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # Weight-0 entries may point at the padding column (≈ −3.4e38): zero them, don't multiply.
    per_row = -torch.where(ok, w * log_probs, torch.zeros_like(log_probs)).sum(1)
    return _masked_mean(per_row, rows)


def distill_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_idx: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    alpha: float,
    temperature: float,
    kind: str = "kl",
    top_m: int = 10,
    teacher_rest: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distillation objective; returns (total, ce, kd) so both parts can be logged.

        L = (1 − alpha) · CE(s, y) + alpha · KD,
        KD = kd_kl (kind "kl"), kd_kl_full (kind "kl_full", needs teacher_rest) or kd_rank (kind "rank")

    alpha == 0 returns CE itself (teacher inputs may be None; kd is a zero tensor): the no-KD
    baseline runs the very same code path. Padding rows (y == 0) are excluded from both terms.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown distillation loss {kind!r}; valid kinds: {', '.join(KINDS)}")
    if alpha == 0:
        ce = cross_entropy(student_logits, targets)
        return ce, ce, torch.zeros((), device=ce.device)
    if teacher_idx is None or teacher_logits is None:
        raise ValueError(f"alpha={alpha} needs teacher_idx and teacher_logits")
    real = targets != 0
    if kind == "kl_full":
        if teacher_rest is None:
            raise ValueError("kd loss 'kl_full' needs the teacher's rest log-mass (soft labels with a `rest` column)")
        log_p = student_logits.float().log_softmax(1)  # one pass over the catalogue for both terms
        ce = F.nll_loss(log_p, targets, ignore_index=0) if real.any() else _zero(student_logits)
        kd = _kl_full_from_log_probs(log_p, teacher_idx, teacher_logits, teacher_rest, temperature, real)
        return (1 - alpha) * ce + alpha * kd, ce, kd
    ce = cross_entropy(student_logits, targets)
    if kind == "kl":
        kd = kd_kl(student_logits, teacher_idx, teacher_logits, temperature, mask=real)
    else:
        kd = kd_rank(student_logits, teacher_idx, teacher_logits, temperature, top_m, mask=real)
    return (1 - alpha) * ce + alpha * kd, ce, kd
