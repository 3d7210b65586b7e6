"""A teacher's soft targets over the whole catalogue, in tiles: top-K logits plus the rest's log-mass.

For every training position the soft labels keep the teacher's K best items with their logits and

    rest = log Σ_{j ∉ top-K} exp(logit_j)        (the padding item 0 contributes exp(-inf) = 0)

A [positions, items] score matrix would need 4·P·V bytes (3.7 GB for one 256-window chunk at 187k
items). Here positions are taken `row_block` at a time and items `item_block` at a time: each tile's
own top-K is merged into a running top-K; the tile's other items, and every candidate the merge
drops, are added to a running log-sum-exp. So `rest` is exact (up to the order of summation) and
memory is one tile, whatever the catalogue size. A catalogue of at most `item_block` items is one tile of every row, bit for
bit the one-matrix computation.

An ensemble's members are combined as the mean of their log-probabilities (models.Ensemble): a
first pass over the tiles gives each member's log-normaliser, the second scores the mean.
"""

from __future__ import annotations

import torch

ROW_BLOCK = 4096  # positions per tile
ITEM_BLOCK = 8192  # items per tile: a 4096 x 8192 fp32 tile is 128 MiB


def top_k_and_rest(hidden: list[torch.Tensor], tables: list[torch.Tensor], k: int, row_block: int = ROW_BLOCK,
                   item_block: int = ITEM_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [P, k], indices [P, k], rest [P]) of the (ensemble of) teacher(s) whose final hidden
    states are `hidden` (one [P, D_m] per member) and item tables `tables` ([V + 1, D_m] each, row 0
    padding). Values are logits for one model, mean log-probabilities for several; best first."""
    if tables[0].shape[0] <= item_block:  # a small catalogue: every row at once, as one matrix
        row_block = max(len(hidden[0]), 1)
    out = [_rows(hidden, tables, k, lo, min(lo + row_block, len(hidden[0])), item_block)
           for lo in range(0, len(hidden[0]), row_block)]
    if not out:
        empty = torch.zeros(0, k, device=tables[0].device)
        return empty, empty.long(), torch.zeros(0, device=tables[0].device)
    return tuple(torch.cat(parts) for parts in zip(*out))  # type: ignore[return-value]


def _rows(hidden, tables, k, lo, hi, item_block):
    h = [x[lo:hi].float() for x in hidden]
    n = tables[0].shape[0]
    if n <= item_block:  # one tile: exactly the one-matrix computation
        scores = _combined(h, tables, 0, n, None)
        top = torch.topk(scores, k, dim=1)
        return top.values, top.indices, scores.scatter(1, top.indices, float("-inf")).logsumexp(1)
    norms = None if len(h) == 1 else [_log_normaliser(x, t, item_block) for x, t in zip(h, tables)]
    values = torch.full((hi - lo, 0), float("-inf"), device=h[0].device)
    indices = torch.zeros((hi - lo, 0), dtype=torch.long, device=h[0].device)
    rest = torch.full((hi - lo,), float("-inf"), device=h[0].device)
    for start in range(0, n, item_block):
        scores = _combined(h, tables, start, min(start + item_block, n), norms)
        tile = torch.topk(scores, _entrants(scores, values, k), dim=1)
        scores.scatter_(1, tile.indices, float("-inf"))  # in place: k entries a row, no copy of the tile
        rest = torch.logaddexp(rest, scores.logsumexp(1))  # the tile's items outside its own top-K
        cand_v, cand_i = torch.cat([values, tile.values], 1), torch.cat([indices, tile.indices + start], 1)
        top = torch.topk(cand_v, min(k, cand_v.shape[1]), dim=1)
        rest = torch.logaddexp(rest, cand_v.scatter(1, top.indices, float("-inf")).logsumexp(1))  # evicted
        values, indices = top.values, cand_i.gather(1, top.indices)
    return values, indices, rest


def _entrants(scores: torch.Tensor, values: torch.Tensor, k: int) -> int:
    """How many of a tile's best items a row needs: at most k, and no more than the most items
    any row has above its current k-th best (late tiles of a large catalogue bring few: ~k·B/V)."""
    if values.shape[1] < k:
        return min(k, scores.shape[1])
    above = int((scores > values[:, -1:]).sum(1).max())
    return max(1, min(k, above))


def _combined(h, tables, start, stop, norms):
    """Scores of items [start, stop): one model's logits, or the members' mean log-probability."""
    if len(h) == 1:
        return _tile(h[0], tables[0], start, stop)
    if norms is None:  # one tile holds the catalogue: normalise it as models.Ensemble.combine does
        out = torch.stack([_tile(x, t, start, stop).log_softmax(-1) for x, t in zip(h, tables)]).mean(0)
    else:
        out = torch.stack([_tile(x, t, start, stop) - z[:, None] for x, t, z in zip(h, tables, norms)]).mean(0)
    if start == 0:
        out[:, 0] = torch.finfo(out.dtype).min
    return out


def _tile(h: torch.Tensor, table: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """h @ table[start:stop].T in fp32, the padding column (item 0) at the dtype's most negative value."""
    scores = h @ table[start:stop].float().T
    if start == 0:
        scores[:, 0] = torch.finfo(scores.dtype).min
    return scores


def _log_normaliser(h: torch.Tensor, table: torch.Tensor, item_block: int) -> torch.Tensor:
    """log Σ_j exp(h · table_j) over the whole catalogue, tile by tile."""
    z = torch.full((len(h),), float("-inf"), device=h.device)
    for start in range(0, table.shape[0], item_block):
        z = torch.logaddexp(z, _tile(h, table, start, min(start + item_block, table.shape[0])).logsumexp(1))
    return z
