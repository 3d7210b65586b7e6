"""Compressed item tables: product quantisation (RecJPQ), and how items get their codes.

Pure PyTorch/NumPy (no Ray, no config). A PQ table stores, per item, C uint8 codes and, per
sub-space, a codebook of K ≤ 256 rows; an item's vector is the concatenation of the C codewords
its codes pick (Petrov & Macdonald, "RecJPQ: Training Large-Catalogue Sequential Recommenders",
WSDM 2024):

    e_i = [ B_1[c_i1] ‖ B_2[c_i2] ‖ … ‖ B_C[c_iC] ]      B_c ∈ R^{K × d_c},  Σ_c d_c = D

Its size is K·D codebook floats plus (V + 1)·C code bytes, against (V + 1)·D floats for a dense
table. `PQTable` stands in for `nn.Embedding` (`table(idx)`, `table.weight`), so a model, its
losses and its scorers see the reconstructed [V + 1, D] table and never care which kind it holds.

Codes are assigned once, before training, and stay fixed (the codes buffer is not trained):

- `kmeans_codes`: k-means per sub-space over any item vectors (the PCA-whitened item text
  vectors; a teacher's folded item table), the centroids returned with the codes;
- `svd_codes`: RecJPQ's teacher-free default: a truncated SVD of the user × item training
  matrix with C components, each item's C loadings cut into K equal-count (quantile) bins.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

KMEANS_ITERS = 25  # Lloyd iterations per sub-space (the assignments of a 12k-item table settle by ~20)


def bounds(dim: int, codes: int) -> list[tuple[int, int]]:
    """The columns [start, end) of each sub-space: `dim` split into `codes` near-equal runs (the
    first `dim % codes` one column wider, as numpy.array_split)."""
    if not 1 <= codes <= dim:
        raise ValueError(f"a PQ table needs 1 <= codes <= dim, got codes {codes}, dim {dim}")
    edges = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(dim), codes)])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


class PQTable(nn.Module):
    """A product-quantised item table [V + 1, D] (row 0 = padding, always zero).

    `codes` is a uint8 buffer [V + 1, C] (saved with the weights, never trained); `codebooks` one
    trained parameter [K, D] whose column block c holds sub-space c's K codewords.
    """

    def __init__(self, num_items: int, dim: int, codes: int, codebook: int = 256):
        super().__init__()
        if not 2 <= codebook <= 256:
            raise ValueError(f"a PQ codebook holds 2..256 rows (uint8 codes), got {codebook}")
        self.num_items, self.dim, self.num_codes, self.codebook = num_items, dim, codes, codebook
        self.bounds = bounds(dim, codes)
        self.register_buffer("codes", torch.zeros(num_items + 1, codes, dtype=torch.uint8))
        self.codebooks = nn.Parameter(torch.randn(codebook, dim) * 0.02)  # as the dense tables' init

    def rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors [..., D] of the code rows [..., C]: each sub-space's codeword, concatenated."""
        parts = [self.codebooks[:, a:b][codes[..., c].long()] for c, (a, b) in enumerate(self.bounds)]
        return torch.cat(parts, -1)

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed table [V + 1, D], padding row zero."""
        return F.pad(self.rows(self.codes[1:]), (0, 0, 1, 0))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Like nn.Embedding(padding_idx=0): the vectors of item indices `idx`, zero at index 0."""
        return self.rows(self.codes[idx]) * (idx != 0).unsqueeze(-1).to(self.codebooks.dtype)

    def lookup_rows(self) -> torch.Tensor:
        """int32 [V + 1, C]: code + c x codebook, each item's rows in the C stacked lookup tables that
        scoring.CodeScores sums. Derived from `codes` (a cache of 4 bytes a code, never saved), rebuilt
        when the codes change; the one conversion a scoring window would otherwise repeat."""
        key = (self.codes.data_ptr(), self.codes._version)
        if getattr(self, "_lookup_key", None) != key:
            offsets = torch.arange(self.num_codes, dtype=torch.int32, device=self.codes.device) * self.codebook
            self._lookup = (self.codes.int() + offsets).contiguous()
            self._lookup_key = key
        return self._lookup

    @torch.no_grad()
    def set_codes(self, codes: np.ndarray | torch.Tensor) -> None:
        """Codes [V, C] of items 1..V (row 0 stays 0)."""
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.uint8)
        if tuple(codes.shape) != (self.num_items, self.num_codes):
            raise ValueError(f"codes {tuple(codes.shape)} for a table of {self.num_items} items x {self.num_codes}")
        self.codes[1:] = codes.to(self.codes.device)

    @torch.no_grad()
    def fit(self, target: np.ndarray | torch.Tensor) -> None:
        """Set each codeword to the mean of the `target` rows [V + 1, w] whose code picks it.

        The least-squares codebooks for these codes: with codes from k-means over `target` they are
        its centroids. Only the first w columns change; unused codewords keep their values.
        """
        target = torch.as_tensor(np.asarray(target), dtype=self.codebooks.dtype, device=self.codebooks.device)
        width = min(target.shape[1], self.dim)
        codes = self.codes[1:].long()
        for c, (a, b) in enumerate(self.bounds):
            b = min(b, width)
            if a >= b:
                break
            sums = torch.zeros(self.codebook, b - a, dtype=target.dtype, device=target.device)
            sums.index_add_(0, codes[:, c], target[1:, a:b])
            counts = torch.bincount(codes[:, c], minlength=self.codebook)
            used = counts > 0
            self.codebooks[used, a:b] = sums[used] / counts[used].unsqueeze(1).to(target.dtype)


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = KMEANS_ITERS) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding: (centroids [k, d] float32, assignment [N] int64).

    Seeded and deterministic. k above the number of distinct rows leaves the extra centroids as
    copies (they get no rows). An emptied cluster keeps its previous centroid.
    """
    gen = torch.Generator().manual_seed(seed)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    n = len(xt)
    centroids = xt[torch.randint(n, (1,), generator=gen)]
    closest = torch.cdist(xt, centroids).squeeze(1) ** 2
    for _ in range(1, k):  # k-means++: the next seed drawn in proportion to the squared distance
        if closest.sum() <= 0:
            pick = torch.randint(n, (1,), generator=gen)
        else:
            pick = torch.multinomial(closest, 1, generator=gen)
        centroids = torch.cat([centroids, xt[pick]])
        closest = torch.minimum(closest, (torch.cdist(xt, xt[pick]).squeeze(1) ** 2))
    assign = torch.cdist(xt, centroids).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assign, xt)
        counts = torch.bincount(assign, minlength=k)
        used = counts > 0
        centroids[used] = sums[used] / counts[used].unsqueeze(1).float()
        new = torch.cdist(xt, centroids).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids.numpy(), assign.numpy()


def kmeans_codes(table: np.ndarray, codes: int, codebook: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PQ codes of the rows of `table` [N, D]: k-means with `codebook` centroids in each of the
    `codes` sub-spaces (columns as `bounds`). Returns (codes [N, C] uint8, centroids [K, D]: column
    block c holds sub-space c's centroids, the layout of PQTable.codebooks)."""
    table = np.asarray(table, dtype=np.float32)
    out = np.zeros((len(table), codes), np.uint8)
    centroids = np.zeros((codebook, table.shape[1]), np.float32)
    for c, (a, b) in enumerate(bounds(table.shape[1], codes)):
        centroids[:, a:b], out[:, c] = kmeans(table[:, a:b], codebook, seed + c)
    return out, centroids


def svd_codes(users: np.ndarray, items: np.ndarray, num_items: int, codes: int, codebook: int = 256,
              seed: int = 0) -> np.ndarray:
    """RecJPQ's code assignment: truncated SVD of the binary user × item training matrix, then each
    of the `codes` item-loading columns cut into `codebook` equal-count bins (by rank; ties by index).

    `users`, `items`: the training interactions (0-based user rows, item indices 1..num_items).
    Returns codes [num_items, C] uint8 for items 1..num_items. Teacher-free: only the log is read.
    """
    num_users = int(users.max()) + 1 if len(users) else 1
    pairs = np.unique(np.stack([users, items - 1]), axis=1)  # binary: a repeat counts once
    matrix = torch.sparse_coo_tensor(torch.as_tensor(pairs), torch.ones(pairs.shape[1]),
                                     (num_users, num_items), check_invariants=False).coalesce()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(matrix, q=min(codes + 10, num_items, num_users), niter=6)
    loadings = v[:, :codes].numpy()
    out = np.zeros((num_items, codes), np.uint8)
    for c in range(loadings.shape[1]):
        order = np.argsort(loadings[:, c], kind="stable")
        out[order, c] = (np.arange(num_items) * codebook // num_items).astype(np.uint8)
    return out
