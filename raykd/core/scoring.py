"""Exact full-catalogue scoring in column blocks: top-k lists and target ranks (issue 24).

A batch of B users over V items makes a [B, V + 1] score matrix: 1 GiB at B = 256, V = 1M. The
functions here compute the scores one window of `block` columns at a time and keep only what is
needed across windows (a running top-k, or a running count), so memory per batch is B x block
whatever the catalogue, and the window stays in cache for the selection that follows it.

Exactness: every answer equals what the whole matrix gives, bit for bit. Each window is the same
product as the matching columns of the whole one (BLAS computes each element over the same
dimension in the same order; checked in tests/test_scoring.py), and every window has `block`
columns (the last one overlaps its predecessor), so each product takes the same kernel. That
holds from MIN_ROWS query rows: BLAS multiplies a single row by another kernel (a matrix-vector
one) whose last bits differ, so callers score fewer rows as a whole matrix (it is small then).

Ties have one rule everywhere (top_k, the per-window selection and the merge): a higher score
first, and among equal scores the lower column (item index) first. Column 0 is padding and never
a candidate (raykd.core.models). Excluded items are given per row as index arrays (`exclude[i]`,
duplicates allowed), never as a [B, V + 1] mask.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raykd.core import models
from raykd.core.item_tables import PQTable

BLOCK = 16384  # columns per window: B x BLOCK floats per batch (16 MiB at B = 256); measured best (bench_scoring.py)
TOPK_BLOCK = 128  # columns per block of top_k's first step
MIN_ROWS = 8  # fewest query rows whose windows match the whole product (one row takes a gemv kernel)
MISS_RANK = 2**31 - 1  # rank given to a NaN or padding target: beyond any cut-off k (= metrics.MISS_RANK)


class Scores(Protocol):
    """Scores [B, width] computed a window at a time: what the blocked functions read."""

    rows: int
    width: int

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Scores of columns start..stop-1, [B, stop - start], a fresh tensor the caller may overwrite."""

    def at(self, columns: torch.Tensor) -> torch.Tensor:
        """Row i's score of column columns[i], [B]: a first guess that the windows then check."""

    def head(self, n: int) -> Scores:
        """The first n rows, each scored exactly as here (a server drops its padding rows with it)."""


class DotScores:
    """scores = queries @ items.T (queries [B, D], items [V + 1, D]), as float32, a window at a time."""

    def __init__(self, queries: torch.Tensor, items: torch.Tensor):
        self.queries, self.items = queries, items
        self.rows, self.width = queries.shape[0], items.shape[0]

    def block(self, start: int, stop: int) -> torch.Tensor:
        return (self.queries @ self.items[start:stop].T).float()

    def at(self, columns: torch.Tensor) -> torch.Tensor:
        # the same kernel as the windows for most batch sizes; blocked_target_ranks checks it anyway
        return (self.queries @ self.items[columns].T).float().diagonal()

    def head(self, n: int) -> Scores:
        return self if n == self.rows else FirstRows(self, n)


class FirstRows:
    """The first n rows of a DotScores, each window still the product of all its query rows: BLAS
    takes another kernel (other last bits) for fewer than MIN_ROWS rows, so the padding rows stay
    in the product and only the selection that follows skips them."""

    def __init__(self, scores: DotScores, n: int):
        self.inner, self.rows, self.width = scores, n, scores.width

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.inner.block(start, stop)[: self.rows]

    def at(self, columns: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([columns, columns.new_ones(self.inner.rows - self.rows)])
        return self.inner.at(padded)[: self.rows]

    def head(self, n: int) -> Scores:
        return FirstRows(self.inner, n)


class FullScores:
    """An already computed [B, width] matrix seen through the Scores protocol (tests, baselines)."""

    def __init__(self, scores: torch.Tensor):
        self.scores = scores
        self.rows, self.width = scores.shape

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.scores[:, start:stop].float().clone()

    def at(self, columns: torch.Tensor) -> torch.Tensor:
        return self.scores.gather(1, columns.unsqueeze(1)).squeeze(1).float()

    def head(self, n: int) -> FullScores:
        return FullScores(self.scores[:n])


class CodeScores:
    """scores = queries @ table.T for a product-quantised table (item_tables.PQTable), without building
    the [V + 1, D] table: per sub-space c a lookup table L_c = q_c @ B_c.T [B, K], and an item's score
    the sum over c of L_c at its code. The lookup tables are stacked as the rows of one [C x K, B] weight
    and each window is one embedding_bag (a fused gather-sum, bags of the C codes in sub-space order),
    so a window reads V x C code bytes where a dense table reads V x D floats. Every entry is summed the
    same way whatever window holds it (and by `at`), so windows and the whole agree exactly; against
    the reconstructed product the sums differ only in rounding (float addition in another order)."""

    def __init__(self, queries: torch.Tensor, table: PQTable):
        self.queries, self.lookup = queries, table.lookup_rows()  # [V + 1, C]: code + c * K
        luts = [(queries[:, a:b] @ table.codebooks[:, a:b].T).float() for a, b in table.bounds]  # [B, K] each
        self.weight = torch.cat([lut.T for lut in luts]).contiguous()  # row c * K + k: L_c[:, k]
        self.rows, self.width = queries.shape[0], self.lookup.shape[0]

    def head(self, n: int) -> CodeScores:
        """The first n rows: their lookup columns only (each entry is a sum of the same lookups in the
        same order, so it equals this one's; the work shrinks with the rows)."""
        if n == self.rows:
            return self
        head = copy.copy(self)
        head.queries, head.weight, head.rows = self.queries[:n], self.weight[:, :n].contiguous(), n
        return head

    def block(self, start: int, stop: int) -> torch.Tensor:
        # [n, B], each item's C lookups summed; returned as a fresh [B, n] (a transposed view of it)
        return F.embedding_bag(self.lookup[start:stop], self.weight, mode="sum").T

    def at(self, columns: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(self.lookup[columns], self.weight, mode="sum").diagonal()  # item columns[i], query i


def dot_scores(net: nn.Module, seq: torch.Tensor) -> DotScores | CodeScores | None:
    """`net.last_scores(seq)` to be read a window at a time, for the families that score by a dot product
    with their item table (SASRec, GRURec: models._score): CodeScores for a PQ table (not text-fused),
    DotScores otherwise; None for the others (an Ensemble normalises over the catalogue)."""
    if not isinstance(net, models.SASRec | models.GRURec):
        return None
    queries = net.forward(seq)[:, -1]
    if isinstance(net.item_emb, PQTable) and getattr(net, "text_proj", None) is None:
        return CodeScores(queries, net.item_emb)
    return DotScores(queries, net.item_table())


def windows(width: int, block: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, skip) per window: columns start..stop-1 are computed, those from start + skip are new.

    Every window has `block` columns, the last one shifted left to end at `width` (skip > 0 there),
    so that every product has the same shape; one window of `width` columns when width <= block.
    """
    if width <= block:
        yield 0, width, 0
        return
    for start in range(0, width, block):
        stop = min(start + block, width)
        yield stop - block, stop, start - (stop - block)


class Exclusions:
    """Per-row excluded columns, sorted by column so that each window finds its own in O(log n)."""

    def __init__(self, exclude: Sequence[np.ndarray | Sequence[int]] | None, rows: int):
        if exclude is not None and len(exclude) != rows:
            raise ValueError(f"exclude has {len(exclude)} rows, the scores {rows}")
        parts = [np.asarray(e, dtype=np.int64).ravel() for e in exclude or []]
        cols = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        row_of = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p) for p in parts])
        order = np.argsort(cols, kind="stable")
        self.rows, self.cols = row_of[order], cols[order]

    def within(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns - start) of the excluded entries in columns start..stop-1."""
        lo, hi = np.searchsorted(self.cols, [start, stop])
        return (torch.from_numpy(self.rows[lo:hi]).to(device),
                torch.from_numpy(self.cols[lo:hi] - start).to(device))

    def contains(self, columns: np.ndarray) -> np.ndarray:
        """[B] bool: row i excludes columns[i]."""
        hit = np.zeros(len(columns), dtype=bool)
        hit[self.rows[self.cols == np.asarray(columns)[self.rows]]] = True
        return hit


def ordered_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k best (score desc, then column asc) of a NaN-free [B, n] tensor, best first.

    torch.topk is exact on values but picks among equal scores by its own internal order (on the
    CPU not the lowest column): the k-th value t is taken from it, and the answer is every column
    above t plus the lowest columns equal to t, sorted stably by score.
    """
    rows = scores.shape[0]
    if k == 0 or rows == 0:
        empty = torch.zeros(rows, 0, dtype=torch.long, device=scores.device)
        return scores.new_zeros(rows, 0), empty
    kth = torch.topk(scores, k, sorted=False).values.amin(1, keepdim=True)
    above, equal = scores > kth, scores == kth
    need = k - above.sum(1, keepdim=True)
    if not bool((equal.sum(1, keepdim=True) == need).all()):  # a tie at the k-th place: lowest columns
        equal &= equal.cumsum(1) <= need
    columns = (above | equal).nonzero()[:, 1].view(rows, k)  # row-major: ascending columns
    values = scores.gather(1, columns)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), columns.gather(1, order)


def top_k(scores: torch.Tensor, k: int, block: int = TOPK_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest scores and their columns, best first, ties to the lower column.

    Two steps: the k blocks of `block` columns with the best maxima (ties to the lower block),
    then the k best of their k x block columns. Exact: an item outside those blocks has k block
    maxima above it or equal to it at a lower column. Reading each row once for a vectorised max
    costs far less than torch.topk's selection over a 100k-item catalogue. NaN must be replaced first.
    """
    scores = scores.contiguous()  # the block view below reads the rows' memory directly
    rows, n = scores.shape
    full = n // block
    if full <= k:
        return ordered_topk(scores, k)
    maxima = torch.as_strided(scores, (rows, full, block), (scores.stride(0), block, 1)).amax(-1)
    if full * block < n:  # the last, partial block
        maxima = torch.cat([maxima, scores[:, full * block:].amax(-1, keepdim=True)], 1)
    blocks = ordered_topk(maxima, k)[1].sort(dim=1).values  # ascending, so columns below ascend too
    columns = (blocks.unsqueeze(-1) * block + torch.arange(block, device=scores.device)).reshape(rows, -1)
    values = scores.gather(1, columns.clamp(max=n - 1)).masked_fill(columns >= n, -torch.inf)
    top_values, picked = ordered_topk(values, k)
    return top_values, columns.gather(1, picked)


def merge_top_k(best: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor],
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of a running top-k and a later window's (all its columns higher), ties to the lower."""
    if best is None:
        return new
    values, columns = torch.cat([best[0], new[0]], 1), torch.cat([best[1], new[1]], 1)
    order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]  # stable: the lower column first
    return values.gather(1, order), columns.gather(1, order)


def blocked_top_k(scores: Scores, k: int, exclude: Sequence[np.ndarray] | None = None, block: int = BLOCK,
                  on_block=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the min(k, width) best columns of `scores` and their scores, best first: exactly
    `top_k` of the whole matrix with column 0 and exclude[i] at -inf, one window at a time.

    on_block(start, window) may replace NaN or infinities in each window (in place) before the
    selection, as a server does; the scores must hold no NaN when selected.
    """
    out = Exclusions(exclude, scores.rows)
    k = min(k, scores.width)
    best = None
    for start, stop, skip in windows(scores.width, block):
        s = scores.block(start, stop)
        if on_block is not None:
            on_block(start, s)
        first = start + skip
        s = s[:, skip:]
        if first == 0:
            s[:, 0] = -torch.inf
        rows, cols = out.within(first, stop, s.device)
        s[rows, cols] = -torch.inf
        values, columns = top_k(s, min(k, s.shape[1]))
        best = merge_top_k(best, (values, columns + first), k)
    return best


def blocked_target_ranks(scores: Scores, targets: torch.Tensor, exclude: Sequence[np.ndarray] | None = None,
                         exclude_target: bool = False, block: int = BLOCK) -> torch.Tensor:
    """0-based pessimistic rank of each target, one window at a time: exactly
    raykd.core.metrics.target_ranks of the whole matrix (same NaN, padding and exclusion rules).

    Each window counts the candidates scoring >= the target's score (or NaN). The target's score
    comes from `scores.at` and is checked in the target's own window; a row whose first guess
    differs there in any bit is counted again with the window's value, so ranks never depend on it.
    """
    targets = targets.long()
    guess = scores.at(targets)
    ranks, actual = _count_above(scores, targets, guess, Exclusions(exclude, len(targets)), block)
    wrong = ~((actual == guess) | (torch.isnan(actual) & torch.isnan(guess)))
    if wrong.any():
        again, _ = _count_above(scores, targets, torch.where(wrong, actual, guess),
                                Exclusions(exclude, len(targets)), block)
        ranks = torch.where(wrong, again, ranks)
    miss = torch.isnan(actual) | (targets == 0)
    if exclude_target and exclude is not None:
        miss |= torch.from_numpy(Exclusions(exclude, len(targets)).contains(targets.cpu().numpy())).to(miss.device)
    return ranks.masked_fill(miss, MISS_RANK)


def _count_above(scores: Scores, targets: torch.Tensor, target_scores: torch.Tensor, out: Exclusions,
                 block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates scoring >= target_scores or NaN, each target's score as its window computed it)."""
    rows = len(targets)
    ranks = torch.zeros(rows, dtype=torch.long, device=targets.device)
    actual = torch.full((rows,), torch.nan, device=targets.device)
    threshold = target_scores.unsqueeze(1)
    for start, stop, skip in windows(scores.width, block):
        first = start + skip
        s = scores.block(start, stop)[:, skip:]
        above = s >= threshold
        suspect = nonfinite_rows(s)
        if len(suspect):  # a NaN counts as scoring above
            above[suspect] |= torch.isnan(s[suspect])
        if first == 0:
            above[:, 0] = False
        inside = ((targets >= first) & (targets < stop)).nonzero().squeeze(1)
        actual[inside] = s[inside, targets[inside] - first]
        above[inside, targets[inside] - first] = False  # the target never competes with itself
        ex_rows, ex_cols = out.within(first, stop, s.device)
        above[ex_rows, ex_cols] = False
        ranks += count_true(above)
    return ranks, actual


def nonfinite_rows(window: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of a [rows, width] score window that may hold a NaN or an infinity.

    A NaN or an infinity anywhere makes its row's sum NaN or infinite, so only those rows need to
    be read entry by entry (an overflowing sum of finite scores just adds a row to read). One sum
    costs far less than an elementwise isfinite over the window.
    """
    return (~torch.isfinite(window.sum(1))).nonzero().squeeze(1)


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries of a [rows, width] bool mask are True (int64 [rows]).

    Summed as int32: torch sums a bool tensor into int64 about 7x slower on the CPU, and a row
    (one window, or a catalogue) holds far fewer than 2**31 entries.
    """
    return mask.sum(1, dtype=torch.int32).long()

