"""Training losses: cross-entropy, top-K knowledge distillation, ranking distillation, sampled softmax
(alone or with any KD term: `sampled_distill_loss`).

Shapes: N rows (flattened training positions), V + 1 columns (item 0 is padding). A row whose
target is 0 is a padding position and is excluded from every loss; a batch with no real row gives
a zero loss that is still connected to the graph. Reductions are means over real rows. Every loss
is computed in float32, whatever the dtype of its inputs (teacher logits are stored as float16).
"""

from __future__ import annotations

import math

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
    but keeps its K bins. Identical logits give exactly 0.

    student_logits [N, V+1]; teacher_idx [N, K]; teacher_logits [N, K]; teacher_rest [N]; mask [N].
    """
    usable = _teacher_entries(teacher_idx, teacher_logits)
    rows = usable.any(1) if mask is None else usable.any(1) & mask
    s_all = student_logits.float()
    taken = torch.zeros_like(s_all, dtype=torch.bool).scatter_(1, teacher_idx, usable)
    taken[:, 0] = True
    r_s = torch.where(taken, torch.tensor(float("-inf"), device=s_all.device), s_all).logsumexp(1)
    return _kl_with_rest(s_all.gather(1, teacher_idx), r_s, usable, teacher_logits, teacher_rest,
                         torch.isfinite(teacher_rest), temperature, rows)


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
    ce = cross_entropy(student_logits, targets)
    if alpha == 0:
        return ce, ce, torch.zeros((), device=ce.device)
    if teacher_idx is None or teacher_logits is None:
        raise ValueError(f"alpha={alpha} needs teacher_idx and teacher_logits")
    real = targets != 0
    if kind == "kl_full":
        if teacher_rest is None:
            raise ValueError("kd loss 'kl_full' needs the teacher's rest log-mass (soft labels with a `rest` column)")
        kd = kd_kl_full(student_logits, teacher_idx, teacher_logits, teacher_rest, temperature, mask=real)
    elif kind == "kl":
        kd = kd_kl(student_logits, teacher_idx, teacher_logits, temperature, mask=real)
    else:
        kd = kd_rank(student_logits, teacher_idx, teacher_logits, temperature, top_m, mask=real)
    return (1 - alpha) * ce + alpha * kd, ce, kd


def sampled_softmax_loss(
    hidden: torch.Tensor,
    item_emb: torch.Tensor,
    targets: torch.Tensor,
    num_negatives: int,
    log_q: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sampled softmax with log-Q correction (Jean et al., ACL 2015; Yi et al., RecSys 2019).

    Negatives S (|S| = n) are drawn with replacement from q = softmax(log_q[1:]) over items
    1..V, shared by the whole batch: log_q = 0 is uniform, log_q = log(popularity) follows
    popularity. Every candidate logit, the positive's too, is corrected by the log of its
    expected count in the sample, log(n · q_j), so the loss estimates full-softmax CE:

        o_j = h · e_j − log(n q_j);   L = mean_i [ −o_{y_i} + log(exp(o_{y_i}) + Σ_{j∈S, j≠y_i} exp(o_j)) ]

    Accidental hits (j == y_i) are masked out. When n >= V every item is used exactly once
    instead (expected count 1, no correction), which is exactly full cross-entropy.

    hidden [N, D]; item_emb [V+1, D] (row 0 padding); targets [N] (0 = ignored); log_q [V+1]
    (entry 0 unused). `generator` must live on log_q's device.
    """
    real = targets != 0
    if not real.any():
        return _zero(hidden, item_emb)
    h, y = hidden[real], targets[real]
    neg, log_count = _negatives(log_q, num_negatives, item_emb.shape[0] - 1, item_emb.device, generator)
    neg_logits = h.float() @ item_emb[neg].float().T - log_count[neg]
    return _sampled_ce(h, item_emb, y, neg, neg_logits, log_count)


def _negatives(log_q: torch.Tensor, num_negatives: int, num_items: int, device,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampled items [n], log expected count of every item [V+1]); every item once when n >= V."""
    if num_negatives >= num_items:
        return torch.arange(1, num_items + 1, device=device), torch.zeros(num_items + 1, device=device)
    log_probs = log_q[1:].float().log_softmax(0)
    neg = torch.multinomial(log_probs.exp(), num_negatives, replacement=True, generator=generator) + 1
    return neg.to(device), F.pad(log_probs + math.log(num_negatives), (1, 0)).to(device)


def _sampled_ce(h, item_emb, y, neg, neg_logits, log_count) -> torch.Tensor:
    pos_logit = (h.float() * item_emb[y].float()).sum(1) - log_count[y]
    neg_logits = neg_logits.masked_fill(neg.unsqueeze(0) == y.unsqueeze(1), torch.finfo(torch.float32).min)
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logits], 1)
    return F.cross_entropy(logits, torch.zeros_like(y))


def row_sampled_softmax_loss(hidden: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor, row_negatives: int,
                             log_q: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`sampled_distill_loss`'s hard-label term with no teacher: every row scores its target exactly
    and `row_negatives` items drawn for it from q = softmax(log_q) (log-Q corrected, hits masked):

        L = mean_i [ log( exp(s_{y_i}) + Σ_{j ∈ S_i, j ≠ y_i} exp(s_j) / (n q_j) ) − s_{y_i} ]

    What a no-KD twin trains on when its KD student uses the per-row sampled softmax, so the pair
    differs only by the KD term (not by how the softmax is estimated)."""
    real = targets != 0
    if not real.any():
        return _zero(hidden, item_emb)
    h, y = hidden[real], targets[real]
    sampled, log_count = _row_samples(log_q, len(h), row_negatives, h.device, generator)
    cand = torch.cat([y.unsqueeze(1), sampled], 1)
    logits = torch.bmm(item_emb[cand].float(), h.float().unsqueeze(2)).squeeze(2)
    corrected = (logits[:, 1:] - log_count).masked_fill(sampled == y.unsqueeze(1), torch.finfo(torch.float32).min)
    log_z = torch.cat([logits[:, :1], corrected], 1).logsumexp(1)
    return (log_z - logits[:, 0]).mean()


def sampled_distill_loss(
    hidden: torch.Tensor,
    item_emb: torch.Tensor,
    targets: torch.Tensor,
    teacher_idx: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    alpha: float,
    temperature: float,
    kind: str,
    num_negatives: int,
    log_q: torch.Tensor,
    top_m: int = 10,
    teacher_rest: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    row_negatives: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`distill_loss` without the full softmax: (total, ce, kd), L = (1 − alpha) · CE_s + alpha · KD_s.

    The student's logits are computed only at each row's K teacher items T_i, its target y_i and
    `row_negatives` items S_i drawn for that row from q = softmax(log_q) (with replacement):
    O(N · (K + n) · D) instead of O(N · V · D). Every log-partition is stratified: exact over
    T_i ∪ {y_i} (where most of the mass is), estimated over the rest of the catalogue with the
    log-Q correction, an unbiased estimate of the rest's mass (Horvitz-Thompson / importance sampling):

        R̂_i = Σ_{j ∈ S_i, j ∉ T_i ∪ {y_i}} exp(s_j) / (n q_j) ≈ Σ_{j ∉ T_i ∪ {y_i}, j ≠ 0} exp(s_j)
        M_i = exp(s_{y_i}) [y_i ∉ T_i] + R̂_i            (the student's mass outside T_i)

    - CE_s = mean_i [ log( Σ_{k ∈ T_i} exp(s_k) + M_i ) − s_{y_i} ];
    - KD kl: exact (`kd_kl` only ever reads s_K);
    - KD kl_full: the student's rest bin is log M_i; the K bins are exact;
    - KD rank: log Z_i = log( Σ_{k ∈ T_i} exp(s_k) + M_i ).

    Samples are drawn per row, not shared by the batch: the rows' errors are independent and
    average out in the item table's gradient (a batch-shared sample of 300 gave gradients at
    cosine 0.85 to the full softmax's on the quickstart, 30 per row 0.99). When `row_negatives`
    >= V this is `distill_loss` on the full logits. alpha == 0 (no teacher) is
    `sampled_softmax_loss` with `num_negatives` shared negatives.
    hidden [N, D]; item_emb [V+1, D]; targets [N]; teacher_* [N, K]; teacher_rest [N].
    """
    if kind not in KINDS:
        raise ValueError(f"unknown distillation loss {kind!r}; valid kinds: {', '.join(KINDS)}")
    if alpha == 0:
        ce = sampled_softmax_loss(hidden, item_emb, targets, num_negatives, log_q, generator)
        return ce, ce, torch.zeros((), device=ce.device)
    if teacher_idx is None or teacher_logits is None:
        raise ValueError(f"alpha={alpha} needs teacher_idx and teacher_logits")
    if kind == "kl_full" and teacher_rest is None:
        raise ValueError("kd loss 'kl_full' needs the teacher's rest log-mass (soft labels with a `rest` column)")
    if row_negatives >= item_emb.shape[0] - 1:  # every item for every row: the full softmax itself
        logits = F.pad(hidden.float() @ item_emb[1:].float().T, (1, 0), value=torch.finfo(torch.float32).min)
        return distill_loss(logits, targets, teacher_idx, teacher_logits, alpha, temperature, kind, top_m, teacher_rest)
    real = targets != 0
    if not real.any():
        zero = _zero(hidden, item_emb)
        return zero, zero, zero
    y, t_idx, t_logits = targets[real], teacher_idx[real], teacher_logits[real]
    usable = _teacher_entries(t_idx, t_logits)
    s_k, s_y, rest, has_rest = stratified_logits(hidden[real], item_emb, y, t_idx, usable, row_negatives, log_q,
                                                 generator)
    fill = torch.finfo(torch.float32).min
    log_z = torch.cat([s_k.masked_fill(~usable, fill), rest.unsqueeze(1)], 1).logsumexp(1)
    ce = (log_z - s_y).mean()
    if kind == "kl":
        kd = _binned_kl(t_logits, s_k, usable, temperature, usable.any(1))
    elif kind == "kl_full":
        t_rest = teacher_rest[real]
        kd = _kl_with_rest(s_k, rest, usable, t_logits, t_rest, torch.isfinite(t_rest) & has_rest, temperature,
                           usable.any(1))
    else:
        order, ok, w = _rank_targets(t_idx, t_logits, temperature, top_m)
        kd = _rank_loss(s_k.gather(1, order) - log_z.unsqueeze(1), ok, w, ok.any(1))
    return (1 - alpha) * ce + alpha * kd, ce, kd


def stratified_logits(h: torch.Tensor, item_emb: torch.Tensor, y: torch.Tensor, teacher_idx: torch.Tensor,
                      usable: torch.Tensor, n: int, log_q: torch.Tensor, generator: torch.Generator | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_K [N, K], s_y [N], log M [N], has [N]) of `sampled_distill_loss`: the student's logits at
    the teacher items and the target, the log of its estimated mass outside the usable teacher
    items (the target exactly, the rest from n samples per row), and whether that mass has any term.
    One gather and one batched product for all K + 1 + n candidates of a row."""
    sampled, log_count = _row_samples(log_q, len(h), n, h.device, generator)
    k = teacher_idx.shape[1]
    cand = torch.cat([teacher_idx, y.unsqueeze(1), sampled], 1)
    logits = torch.bmm(item_emb[cand].float(), h.float().unsqueeze(2)).squeeze(2)
    s_k, s_y = logits[:, :k], logits[:, k]
    corrected = logits[:, k + 1:] - log_count
    y_in_top = ((teacher_idx == y.unsqueeze(1)) & usable).any(1)
    keep = ~_in_rows(sampled, teacher_idx, usable) & (sampled != y.unsqueeze(1))
    fill = torch.finfo(torch.float32).min
    rest = torch.cat([s_y.masked_fill(y_in_top, fill).unsqueeze(1), corrected.masked_fill(~keep, fill)], 1)
    return s_k, s_y, rest.logsumexp(1), keep.any(1) | ~y_in_top


def _row_samples(log_q: torch.Tensor, rows: int, n: int, device, generator: torch.Generator | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` items per row drawn with replacement from q = softmax(log_q[1:]) ([rows, n], ids from 1),
    and the log of each draw's expected count, log(n q_j): the log-Q correction."""
    log_probs = log_q[1:].float().log_softmax(0)
    draws = torch.multinomial(log_probs.exp(), rows * n, replacement=True, generator=generator)
    sampled = draws.to(device).view(rows, n) + 1
    return sampled, log_probs.to(device)[sampled - 1] + math.log(n)


def _in_rows(items: torch.Tensor, sets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N, n]: whether items[i, m] is one of the valid entries of sets[i] (a sorted search per row)."""
    ordered = torch.where(valid, sets, -1).sort(1).values
    at = torch.searchsorted(ordered, items).clamp(max=ordered.shape[1] - 1)
    return ordered.gather(1, at) == items
