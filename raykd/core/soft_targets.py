"""A teacher's soft targets over the whole catalogue, in tiles: top-K logits plus the rest's log-mass.

For every training position the soft labels keep the teacher's K best items with their logits and

    rest = log Σ_{j ∉ top-K} exp(logit_j)        (the padding item 0 contributes exp(-inf) = 0)

A [positions, items] score matrix would need 4·P·V bytes (3.7 GB for one 256-window chunk at 187k
items). Here positions are taken `row_block` at a time and items `item_block` at a time, so memory
is one tile (4 MiB by default, in cache), whatever the catalogue size. Per tile, after the product:

- **Candidates without a sort.** Every row keeps a threshold τ that is at most its final K-th best
  logit: at first the K-th largest of its first tile's group maxima (groups of `group` items: K
  groups each hold an item ≥ that value), then its running K-th best. Only groups whose maximum
  reaches τ are looked into; their items ≥ τ are the candidates, merged into the running top-K.
  Late tiles of a large catalogue bring few (~K·T/V a row), so the cost is one pass of maxima.
- **The rest in one pass.** Candidates are set to -inf in the tile; everything else can never
  enter the top-K, so the tile adds Σ exp(s − m) to a float64 running sum (m: the row's running
  maximum, rescaled as it grows), as do the candidates the merge evicts. So `rest` is exact up to
  the order of summation: no large total minus the top-K's mass.

A catalogue of at most `item_block` items is one tile of every row, bit for bit the one-matrix
computation. An ensemble's members are combined as the mean of their log-probabilities
(models.Ensemble): a first pass over the tiles gives each member's log-normaliser, the second
scores the mean.
"""

from __future__ import annotations

import torch

ROW_BLOCK = 128  # positions per tile
ITEM_BLOCK = 8192  # items per tile: a 128 x 8192 fp32 tile is 4 MiB, cache-resident on a server core
GROUP = 32  # items per group whose maximum is checked against a row's threshold
_NEG = float("-inf")


def top_k_and_rest(hidden: list[torch.Tensor], tables: list[torch.Tensor], k: int, row_block: int = ROW_BLOCK,
                   item_block: int = ITEM_BLOCK, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [P, k], indices [P, k], rest [P]) of the (ensemble of) teacher(s) whose final hidden
    states are `hidden` (one [P, D_m] per member) and item tables `tables` ([V + 1, D_m] each, row 0
    padding). Values are logits for one model, mean log-probabilities for several; best first."""
    if tables[0].shape[0] <= item_block:  # a small catalogue: every row at once, as one matrix
        row_block = max(len(hidden[0]), 1)
    out = [_rows(hidden, tables, k, lo, min(lo + row_block, len(hidden[0])), item_block, group)
           for lo in range(0, len(hidden[0]), row_block)]
    if not out:
        empty = torch.zeros(0, k, device=tables[0].device)
        return empty, empty.long(), torch.zeros(0, device=tables[0].device)
    return tuple(torch.cat(parts) for parts in zip(*out))  # type: ignore[return-value]


def _rows(hidden, tables, k, lo, hi, item_block, group):
    h = [x[lo:hi].float() for x in hidden]
    n = tables[0].shape[0]
    if n <= item_block:  # one tile: exactly the one-matrix computation
        scores = _combined(h, tables, 0, n, None)
        top = torch.topk(scores, k, dim=1)
        return top.values, top.indices, scores.scatter(1, top.indices, _NEG).logsumexp(1)
    norms = None if len(h) == 1 else [_log_normaliser(x, t, item_block) for x, t in zip(h, tables)]
    run = _RunningTopK(hi - lo, k, h[0].device)
    buf = torch.empty(hi - lo, item_block, device=h[0].device) if len(h) == 1 else None
    for start in range(0, n, item_block):
        stop = min(start + item_block, n)
        if buf is not None:  # one model: the product straight into the reused tile
            scores = torch.mm(h[0], tables[0][start:stop].float().T, out=buf[:, :stop - start])
            if start == 0:
                scores[:, 0] = torch.finfo(scores.dtype).min
        else:
            scores = _combined(h, tables, start, stop, norms)
        run.add(scores, start, min(group, stop - start))
    return run.values, run.indices, run.rest()


class _RunningTopK:
    """The running top-K, threshold and rest of a block of rows, fed one tile of scores at a time."""

    def __init__(self, rows: int, k: int, device):
        self.k, self.device = k, device
        self.values = torch.full((rows, 0), _NEG, device=device)
        self.indices = torch.zeros((rows, 0), dtype=torch.long, device=device)
        self.tau: torch.Tensor | None = None  # [rows, 1], at most each row's final k-th best
        self.top = torch.full((rows, 1), _NEG, device=device)  # the running maximum, the exp reference
        self.mass = torch.zeros(rows, dtype=torch.float64, device=device)  # Σ exp(s - top), items out of the top-K

    def add(self, scores: torch.Tensor, start: int, group: int) -> None:
        """Merge a tile (items start..start + width); `scores` is overwritten."""
        maxima = _group_maxima(scores, group)
        if self.tau is None:  # k groups each hold an item at least as good as their k-th best maximum
            self.tau = (maxima.topk(self.k, dim=1).values[:, -1:] if maxima.shape[1] >= self.k
                        else torch.full_like(maxima[:, :1], _NEG))
        top = torch.maximum(self.top, maxima.amax(1, keepdim=True))
        self.mass.mul_(torch.exp(self.top - top).squeeze(1).double().nan_to_num_(0.0))
        self.top = top
        rows, cols, vals = _candidates(scores, maxima, self.tau, group)
        if len(rows):
            scores[rows, cols] = _NEG  # in the top-K or evicted below: counted once, there
            self._merge(rows, cols + start, vals)
        self.mass += scores.sub_(self.top).exp_().sum(1).double()

    def _merge(self, rows, items, vals):
        n = len(self.values)
        counts = torch.bincount(rows, minlength=n)
        order = torch.argsort(rows, stable=True)
        rows, items, vals = rows[order], items[order], vals[order]
        slot = torch.arange(len(rows), device=self.device) - (torch.cumsum(counts, 0) - counts)[rows]
        held = self.values.shape[1]
        pool_v = torch.full((n, held + int(counts.max())), _NEG, device=self.device)
        pool_i = torch.zeros(pool_v.shape, dtype=torch.long, device=self.device)
        pool_v[:, :held], pool_i[:, :held] = self.values, self.indices
        pool_v[rows, held + slot], pool_i[rows, held + slot] = vals, items
        best = torch.topk(pool_v, min(self.k, pool_v.shape[1]), dim=1)
        evicted = pool_v.scatter(1, best.indices, _NEG)
        self.mass += (evicted - self.top).exp().sum(1).double()
        self.values, self.indices = best.values, pool_i.gather(1, best.indices)
        if self.values.shape[1] == self.k:
            self.tau = torch.maximum(self.tau, self.values[:, -1:])

    def rest(self) -> torch.Tensor:
        return (self.mass.log() + self.top.squeeze(1).double()).float()


def _group_maxima(scores: torch.Tensor, group: int) -> torch.Tensor:
    """[rows, ceil(width / group)]: the maximum of each run of `group` items (the last may be short)."""
    full = scores.shape[1] // group * group
    maxima = scores[:, :full].reshape(len(scores), -1, group).amax(2)
    if full < scores.shape[1]:
        maxima = torch.cat([maxima, scores[:, full:].amax(1, keepdim=True)], 1)
    return maxima


def _candidates(scores, maxima, tau, group):
    """(rows, columns, values) of the tile's items ≥ their row's τ, read only in the groups whose
    maximum reaches τ (contiguous runs of `group` floats, copied out by one index_select)."""
    g_rows, g_cols = (maxima >= tau).nonzero(as_tuple=True)
    whole = scores.shape[1] // group
    inside = g_cols < whole
    r, c = g_rows[inside], g_cols[inside]
    runs = scores[:, :whole * group].reshape(-1, group).index_select(0, r * whole + c)
    hit_run, hit_col = (runs >= tau[r]).nonzero(as_tuple=True)
    rows, cols, vals = r[hit_run], c[hit_run] * group + hit_col, runs[hit_run, hit_col]
    if not bool(inside.all()):  # the short last group
        tail = scores[:, whole * group:]
        t_rows, t_cols = (tail >= tau).nonzero(as_tuple=True)
        rows, cols = torch.cat([rows, t_rows]), torch.cat([cols, t_cols + whole * group])
        vals = torch.cat([vals, tail[t_rows, t_cols]])
    return rows, cols, vals


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
