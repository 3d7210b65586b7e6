"""Item representations from outside the id table: reduced language-model vectors, and transfer.

Pure NumPy/PyTorch (no Ray). Two uses:

- a text teacher: the frozen language-model vectors of `embed-items` are centred, PCA-reduced and
  whitened (`reduce`), then fused into the teacher (a trained projection of them is added to the id
  embedding) and/or used to initialise its id embeddings (`init_item_table`), after Harte et al.,
  "Leveraging Large Language Models for Sequential Recommendation" (RecSys 2023);
- embedding transfer: a student's item table starts from its teacher's item representations,
  reduced to the student's width the same way, so what the teacher learned from text reaches an
  id-only student that needs no text encoder when serving.
"""

from __future__ import annotations

import numpy as np
import torch

from raykd.core.item_tables import PQTable


def reduce(vectors: np.ndarray, dim: int, whiten: bool = True) -> np.ndarray:
    """Centre, project on the top-`dim` principal axes and (optionally) whiten.

        X_c = X − mean(X),  X_c = U S Vᵀ (thin SVD),  Z = X_c V[:, :dim] / (S[:dim] / √(n − 1))

    Whitened, every output column has variance 1 over the rows that have a vector (anisotropic
    language-model vectors become isotropic). Rows that are all zero (row 0 = padding, items
    without text) stay zero. `dim` above the rank is cut to the rank. Input [V + 1, d], output
    [V + 1, min(dim, rank)] float32; deterministic (sign of each axis fixed by its largest entry).
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    has = np.abs(vectors).sum(1) > 0
    x = vectors[has]
    out = np.zeros((len(vectors), 0), np.float32)
    if len(x) < 2:
        return out
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    keep = int(min(dim, (s > s[0] * 1e-6).sum()))
    axes = vt[:keep]
    axes *= np.sign(axes[np.arange(keep), np.abs(axes).argmax(1)])[:, None]  # deterministic signs
    z = xc @ axes.T
    if whiten:
        z /= s[:keep] / np.sqrt(max(len(x) - 1, 1))
    out = np.zeros((len(vectors), keep), np.float32)
    out[has] = z
    return out


def init_item_table(model: torch.nn.Module, reduced: np.ndarray, std: float) -> None:
    """Overwrite the model's id embeddings (rows 1..V) with `reduced`, scaled to std per column.

    Columns beyond `reduced`'s width keep their random init; the padding row stays zero. A PQ
    table's codebooks are fitted to the scaled rows instead (item_tables.PQTable.fit: each codeword
    the mean of its items' rows; with codes from k-means over them, the centroids).
    """
    emb = model.item_emb.weight
    if reduced.shape[0] != emb.shape[0]:
        raise ValueError(f"item init has {reduced.shape[0] - 1} items but the model has {emb.shape[0] - 1}")
    width = min(reduced.shape[1], emb.shape[1])
    col_std = reduced[1:, :width].std(0, keepdims=True)
    scaled = reduced[:, :width] / np.where(col_std > 0, col_std, 1.0) * std
    if isinstance(model.item_emb, PQTable):
        model.item_emb.fit(scaled)
        return
    with torch.no_grad():
        emb[1:, :width] = torch.as_tensor(scaled[1:], dtype=emb.dtype, device=emb.device)
        emb[0].zero_()


def teacher_items(teacher: torch.nn.Module) -> np.ndarray:
    """The teacher's item representations [V + 1, D] (id embedding plus fused text, as it scores)."""
    with torch.no_grad():
        table = teacher.item_table().detach().float().cpu().numpy().copy()
    table[0] = 0.0
    return table
