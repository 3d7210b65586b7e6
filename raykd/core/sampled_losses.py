"""Sampled-softmax losses for large catalogues: hard labels alone (`sampled_softmax_loss`, a batch-
shared sample; `row_sampled_softmax_loss`, a sample per row) or with any KD term of `raykd.core.losses`
(`sampled_distill_loss`). Same shapes and conventions as `raykd.core.losses`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raykd.core.losses import (
    KINDS,
    _binned_kl,
    _kl_with_rest,
    _rank_loss,
    _rank_targets,
    _teacher_entries,
    _zero,
    distill_loss,
)


def sampled_softmax_loss(
    hidden: torch.Tensor,
    item_emb: torch.Tensor,
    targets: torch.Tensor,
    num_negatives: int,
    log_q: torch.Tensor,
    generator: torch.Generator | None = None,
    sparse: bool = False,
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
    (entry 0 unused). `generator` must live on log_q's device. `sparse`: the table's gradient is
    a sparse tensor of the rows used (`rows`).
    """
    real = targets != 0
    if not real.any():
        return _nothing(hidden, item_emb, sparse)
    h, y = hidden[real], targets[real]
    neg, log_count = _negatives(log_q, num_negatives, item_emb.shape[0] - 1, item_emb.device, generator)
    neg_logits = h.float() @ rows(item_emb, neg, sparse).float().T - log_count[neg]
    pos_logit = (h.float() * rows(item_emb, y, sparse).float()).sum(1) - log_count[y]
    return _sampled_ce(y, neg, pos_logit, neg_logits)


def rows(table: torch.Tensor, idx: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """table[idx]; with `sparse` through F.embedding(sparse=True), so the table's gradient is a
    sparse tensor holding only those rows (SparseAdam updates just them) instead of a dense [V+1, D]."""
    return F.embedding(idx, table, sparse=True) if sparse else table[idx]


def _nothing(hidden: torch.Tensor, item_emb: torch.Tensor, sparse: bool) -> torch.Tensor:
    """An exact 0 that still gives every input a gradient (`_zero`), a sparse one for a sparse table."""
    if not sparse:
        return _zero(hidden, item_emb)
    return _zero(hidden) + rows(item_emb, torch.zeros(0, dtype=torch.long, device=item_emb.device), True).sum()


def _negatives(log_q: torch.Tensor, num_negatives: int, num_items: int, device,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampled items [n], log expected count of every item [V+1]); every item once when n >= V."""
    if num_negatives >= num_items:
        return torch.arange(1, num_items + 1, device=device), torch.zeros(num_items + 1, device=device)
    log_probs = log_q[1:].float().log_softmax(0)
    neg = torch.multinomial(log_probs.exp(), num_negatives, replacement=True, generator=generator) + 1
    return neg.to(device), F.pad(log_probs + math.log(num_negatives), (1, 0)).to(device)


def _sampled_ce(y, neg, pos_logit, neg_logits) -> torch.Tensor:
    neg_logits = neg_logits.masked_fill(neg.unsqueeze(0) == y.unsqueeze(1), torch.finfo(torch.float32).min)
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logits], 1)
    return F.cross_entropy(logits, torch.zeros_like(y))


def row_sampled_softmax_loss(hidden: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor, row_negatives: int,
                             log_q: torch.Tensor, generator: torch.Generator | None = None,
                             sparse: bool = False) -> torch.Tensor:
    """`sampled_distill_loss`'s hard-label term with no teacher: every row scores its target exactly
    and `row_negatives` items drawn for it from q = softmax(log_q) (log-Q corrected, hits masked):

        L = mean_i [ log( exp(s_{y_i}) + Σ_{j ∈ S_i, j ≠ y_i} exp(s_j) / (n q_j) ) − s_{y_i} ]

    What a no-KD twin trains on when its KD student uses the per-row sampled softmax, so the pair
    differs only by the KD term (not by how the softmax is estimated)."""
    real = targets != 0
    if not real.any():
        return _nothing(hidden, item_emb, sparse)
    h, y = hidden[real], targets[real]
    sampled, log_count = _row_samples(log_q, len(h), row_negatives, h.device, generator)
    cand = torch.cat([y.unsqueeze(1), sampled], 1)
    logits = torch.bmm(rows(item_emb, cand, sparse).float(), h.float().unsqueeze(2)).squeeze(2)
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
    sparse: bool = False,
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
        ce = sampled_softmax_loss(hidden, item_emb, targets, num_negatives, log_q, generator, sparse)
        return ce, ce, torch.zeros((), device=ce.device)
    if teacher_idx is None or teacher_logits is None:
        raise ValueError(f"alpha={alpha} needs teacher_idx and teacher_logits")
    if kind == "kl_full" and teacher_rest is None:
        raise ValueError("kd loss 'kl_full' needs the teacher's rest log-mass (soft labels with a `rest` column)")
    if row_negatives >= item_emb.shape[0] - 1:  # every item for every row: the full softmax itself (dense)
        logits = F.pad(hidden.float() @ item_emb[1:].float().T, (1, 0), value=torch.finfo(torch.float32).min)
        return distill_loss(logits, targets, teacher_idx, teacher_logits, alpha, temperature, kind, top_m, teacher_rest)
    real = targets != 0
    if not real.any():
        zero = _nothing(hidden, item_emb, sparse)
        return zero, zero, zero
    y, t_idx, t_logits = targets[real], teacher_idx[real], teacher_logits[real]
    usable = _teacher_entries(t_idx, t_logits)
    s_k, s_y, rest, has_rest = stratified_logits(hidden[real], item_emb, y, t_idx, usable, row_negatives, log_q,
                                                 generator, sparse)
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
                      sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_K [N, K], s_y [N], log M [N], has [N]) of `sampled_distill_loss`: the student's logits at
    the teacher items and the target, the log of its estimated mass outside the usable teacher
    items (the target exactly, the rest from n samples per row), and whether that mass has any term.
    One gather and one batched product for all K + 1 + n candidates of a row."""
    sampled, log_count = _row_samples(log_q, len(h), n, h.device, generator)
    k = teacher_idx.shape[1]
    cand = torch.cat([teacher_idx, y.unsqueeze(1), sampled], 1)
    logits = torch.bmm(rows(item_emb, cand, sparse).float(), h.float().unsqueeze(2)).squeeze(2)
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
