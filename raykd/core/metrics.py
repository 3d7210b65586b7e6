"""Full-catalogue ranking metrics under leave-one-out (GUIDE.md section 2).

Each user has one held-out item y. Its 0-based rank among all candidate items decides every
metric; candidates are items 1..V minus the user's excluded (already seen) items. The target
itself is never excluded, so a repeat purchase is ranked rather than an automatic miss. Ranks
are pessimistic: ties and NaN scores count against the target, so a model that scores every
item the same (or NaN) gets no credit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from raykd.core import scoring
from raykd.core.models import left_pad, unwrap

MISS_RANK = scoring.MISS_RANK  # rank given to a NaN or padding target: beyond any cut-off k


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None,
                 exclude_target: bool = False) -> torch.Tensor:
    """0-based pessimistic rank of each target among the non-excluded items.

        rank_i = |{ j ∉ E_i ∪ {0, y_i} : s_ij >= s_iy  or  s_ij is NaN }|

    A NaN (or padding, y = 0) target is a miss: rank = MISS_RANK, beyond every cut-off k.
    scores [B, V+1] float; targets [B] long; exclude [B, V+1] bool (True = not a candidate).
    exclude_target: a target inside E_i is a miss too (what a server that never recommends a seen
    item answers); by default it stays a candidate.
    """
    target_scores = scores.gather(1, targets.unsqueeze(1))
    above = (scores >= target_scores) | torch.isnan(scores)
    candidates = torch.ones_like(above)
    if exclude is not None:
        candidates &= ~exclude
    candidates[:, 0] = False
    candidates.scatter_(1, targets.unsqueeze(1), False)  # the target never competes with itself
    ranks = scoring.count_true(above & candidates)
    miss = torch.isnan(target_scores.squeeze(1)) | (targets == 0)
    if exclude_target and exclude is not None:
        miss |= exclude.gather(1, targets.unsqueeze(1)).squeeze(1)
    return ranks.masked_fill(miss, MISS_RANK)


def ranking_metrics(ranks: torch.Tensor | np.ndarray, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Means over users of, for each k in ks (one relevant item per user, 0-based rank r):

        hr@k   = 1[r < k]                      (= Recall@k under leave-one-out)
        ndcg@k = 1[r < k] / log2(r + 2)        (ideal DCG is 1)
        mrr@k  = 1[r < k] / (r + 1)
    """
    r = torch.as_tensor(ranks).double()
    if r.numel() == 0:
        raise ValueError("no ranks to average: the evaluation set is empty")
    out = {}
    for k in ks:
        hit = r < k
        out[f"ndcg@{k}"] = float(torch.where(hit, 1.0 / torch.log2(r + 2), 0.0).mean())
        out[f"hr@{k}"] = float(hit.double().mean())
        out[f"mrr@{k}"] = float(torch.where(hit, 1.0 / (r + 1), 0.0).mean())
    return out


def exclusion_mask(seen: Sequence[np.ndarray], width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, width] bool with row i True at the item indices in seen[i]."""
    lengths = [len(s) for s in seen]
    rows = np.repeat(np.arange(len(seen)), lengths)
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in seen]) if rows.size else rows
    mask = torch.zeros(len(seen), width, dtype=torch.bool)
    mask[torch.from_numpy(rows), torch.from_numpy(cols.astype(np.int64))] = True
    return mask.to(device)


def _model_device(model: nn.Module) -> torch.device:
    # A model without parameters or buffers (a fixed baseline) scores on the CPU.
    tensors = [*model.parameters(), *model.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


def evaluate_model(
    model: nn.Module,
    histories: Sequence[np.ndarray] | torch.Tensor,
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    seen: Sequence[np.ndarray] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    ks: Sequence[int] = (10, 20),
    return_ranks: bool = False,
    exclude_target: bool = False,
    block: int = scoring.BLOCK,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float] | tuple[dict[str, float], np.ndarray]:
    """Full-catalogue metrics of `model.last_scores` on (history, next item) pairs.

    histories: 1-D item arrays (left-padded here to the model's max_len, last max_len kept) or
    an already padded LongTensor [U, L]. seen[u]: items excluded from user u's candidates
    (typically the history); the target itself stays a candidate unless `exclude_target`, which
    makes a target found in seen[u] a miss, as for a server that never recommends a seen item. device: where to score;
    None uses the model's own device, otherwise the model is moved there. The model is put in
    eval mode for the call and its training flag restored afterwards. A catalogue wider than
    `block` is ranked in windows of `block` items (raykd.core.scoring: memory per batch does not
    grow with it) by the models that score by a dot product; the ranks are the same either way.

    `progress(done, total)` is called after every batch of users (a caller's progress line).

    Returns {metric: mean, ..., "users": U}, plus the per-user ranks (np.int64 [U], for paired
    tests) as a second value when return_ranks is True.
    """
    net = unwrap(model)
    if device is not None:
        net.to(device)
    device = _model_device(net)
    if not isinstance(histories, torch.Tensor):
        histories = left_pad(list(histories), net.max_len)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if len(targets) != len(histories) or (seen is not None and len(seen) != len(targets)):
        raise ValueError("histories, targets and seen must have one entry per user")
    was_training = net.training
    net.eval()
    ranks = []
    try:
        with torch.no_grad():
            for start in range(0, len(targets), batch_size):
                stop = start + batch_size
                batch = (histories[start:stop].to(device), targets[start:stop].to(device))
                ranks.append(_batch_ranks(net, *batch, None if seen is None else seen[start:stop],
                                          exclude_target, block).cpu())
                if progress is not None:
                    progress(min(stop, len(targets)), len(targets))
    finally:
        net.train(was_training)
    all_ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    metrics = {**ranking_metrics(all_ranks, ks), "users": len(all_ranks)}
    return (metrics, all_ranks.numpy()) if return_ranks else metrics


def _batch_ranks(net: nn.Module, seq: torch.Tensor, targets: torch.Tensor, seen: Sequence[np.ndarray] | None,
                 exclude_target: bool, block: int) -> torch.Tensor:
    """target_ranks of one batch: in windows (scoring.blocked_target_ranks) when the catalogue is
    wider than a window and the model scores by a dot product, else on the whole score matrix."""
    wide = getattr(net, "num_items", 0) + 1 > block and len(seq) >= scoring.MIN_ROWS
    dot = scoring.dot_scores(net, seq) if wide else None
    if dot is not None:
        return scoring.blocked_target_ranks(dot, targets, seen, exclude_target, block)
    scores = net.last_scores(seq)
    exclude = None if seen is None else exclusion_mask(seen, scores.shape[1], seq.device)
    return target_ranks(scores, targets, exclude, exclude_target)


def topk_overlap(
    scores_a: torch.Tensor, scores_b: torch.Tensor, k: int = 10, exclude: torch.Tensor | None = None
) -> float:
    """Mean over rows of |top-k(a) ∩ top-k(b)| / k, over items 1..V minus `exclude`.

    How closely a student reproduces its teacher's lists. NaN counts as the lowest score here;
    among tied scores the top-k picks arbitrarily.
    """
    def top(scores: torch.Tensor) -> torch.Tensor:
        s = torch.nan_to_num(scores.float(), nan=float("-inf"))
        s[:, 0] = float("-inf")
        if exclude is not None:
            s = s.masked_fill(exclude, float("-inf"))
        return s.topk(k, dim=1).indices

    a, b = top(scores_a), top(scores_b)
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1)
    return float(shared.double().mean() / k)


def scoring_latency_ms(
    model: nn.Module, max_len: int, num_items: int, batch_size: int = 256, repeats: int = 20
) -> float:
    """Median wall-clock ms of one `last_scores` call on `batch_size` full-length random histories.

    Runs on the model's device, in eval mode without gradients, after two warm-up calls.
    """
    net = unwrap(model)
    device = _model_device(net)
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(1, num_items + 1, (batch_size, max_len), generator=gen).to(device)
    was_training = net.training
    net.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(repeats + 2):
                _sync(device)
                start = time.perf_counter()
                net.last_scores(seq)
                _sync(device)
                if i >= 2:
                    times.append((time.perf_counter() - start) * 1000)
    finally:
        net.train(was_training)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the timer measures the launch only.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
