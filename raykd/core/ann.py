"""An approximate top-k index over a model's item table (issue 24 item 2): opt-in, exact stays the default.

The families that score by a dot product (SASRec, GRURec: raykd.core.scoring.dot_scores) rank items
by hidden @ item_table.T: a maximum-inner-product search, which an index answers without scoring
the whole catalogue. The index is a faiss HNSW graph with the inner-product metric (`faiss-cpu`, `pip install "raykd[ann]"`)
over the item table's rows 1..V (row 0 is padding and never returned), chosen by measurement against
IVF-Flat, IVF-PQ, HNSW on L2-augmented vectors and usearch (benchmarks/bench_ann.py, RESULTS.md).

Search asks the index for k + |history| candidates, drops the history (seen-item exclusion) and
re-ranks the rest by their exact dot product, ties to the lower item as in raykd.core.scoring; a
row left with fewer than k items (the index missed some) is scored exactly. The answer has the
shapes of `scoring.blocked_top_k` (values [B, min(k, V + 1)], columns alike, -inf / 0 where fewer
items remain), so callers swap one for the other. Its recall@10 against exact scoring is measured
at build time on a seeded sample of queries and kept with the index.

On disk (a folder, e.g. a bundle's `ann/`): `index.faiss` and `ann.json` (settings, recall,
the vocabulary digest of the model's items and a digest of the item table it was built from);
`load` refuses an index whose digests differ from the model's.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from raykd.core import console, models, rundir, scoring, sequences
from raykd.core.errors import RaykdError

LINKS = 16  # HNSW links per node (M): bench_ann.py
EF_CONSTRUCTION = 40  # HNSW build beam (faiss's default): bench_ann.py
EF_SEARCH = 128  # HNSW search beam (at least k + |history|): recall@10 >= 0.98 at 1M items in bench_ann.py
ADD_ROWS = 100_000  # items added per step of a build, a progress line between steps
PROGRESS_S = 20  # seconds between a build's progress lines
RECALL_K = 10  # the recall reported: recall@10 against exact
RECALL_QUERIES = 512  # seeded sample of queries the recall is measured on
INDEX_DIR = "ann"  # the index's folder inside a bundle
INDEX_FILE, META_FILE = "index.faiss", "ann.json"
INSTALL = 'pip install "raykd[ann]"'


def faiss_module():
    """The faiss module, or a RaykdError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise RaykdError(f"the approximate index needs faiss: {INSTALL} (or pip install faiss-cpu); "
                         "without it, leave the index off (exact scoring, the default)") from None
    return faiss


def table_digest(table: torch.Tensor) -> str:
    """BLAKE2b of the item table's float32 bytes: which model's items an index was built from."""
    data = np.ascontiguousarray(table.detach().cpu().float().numpy())
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def rerank(table: torch.Tensor, queries: torch.Tensor, cands: np.ndarray, exclude: Sequence[np.ndarray],
           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k best candidates by exact dot product, best first, ties to the lower item.

    cands [B, n] item indices (< 1: no candidate); candidates in exclude[i], repeats and misses get
    -inf and column 0. Returns (values [B, k], columns [B, k]).
    """
    rows, n = cands.shape
    cols = np.sort(np.where(cands > 0, cands, 0), axis=1)  # ascending, so a stable sort breaks ties low
    bad = cols <= 0
    bad[:, 1:] |= cols[:, 1:] == cols[:, :-1]
    width = table.shape[0]
    lens = [len(e) for e in exclude]
    if sum(lens):
        seen = np.repeat(np.arange(rows, dtype=np.int64), lens) * width + np.concatenate(exclude).astype(np.int64)
        bad |= np.isin(np.arange(rows, dtype=np.int64)[:, None] * width + cols, seen)
    c = torch.from_numpy(cols)
    values = torch.einsum("bd,bnd->bn", queries.float(), table[c].float())
    values.masked_fill_(torch.from_numpy(bad) | ~torch.isfinite(values), -torch.inf)
    order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
    values, c = values.gather(1, order), c.gather(1, order)
    if n < k:
        values = torch.cat([values, values.new_full((rows, k - n), -torch.inf)], 1)
        c = torch.cat([c, c.new_zeros(rows, k - n)], 1)
    return values, c.masked_fill(torch.isinf(values) & (values < 0), 0)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |found ∩ truth| / |truth|, items < 1 (padding, none) left out of both."""
    shares = []
    for f, t in zip(found, truth):
        t = set(t[t > 0].tolist())
        if t:
            shares.append(len(t & set(f[f > 0].tolist())) / len(t))
    return float(np.mean(shares)) if shares else 1.0


class Index:
    """A faiss index over an item table, and the table it re-ranks with: what `search` answers from."""

    def __init__(self, engine, table: torch.Tensor, meta: dict):
        self.engine, self.table, self.meta = engine, table.detach().float(), meta

    @property
    def recall(self) -> float | None:
        """recall@10 against exact scoring, measured when the index was built."""
        return self.meta.get("recall@10")

    def candidates(self, queries: torch.Tensor, n: int) -> np.ndarray:
        """[B, n] item indices the index finds for the queries (0: none)."""
        faiss = faiss_module()
        faiss.omp_set_num_threads(torch.get_num_threads())  # a replica's or actor's share, not every core
        params = faiss.SearchParametersHNSW(efSearch=max(self.meta["ef_search"], n))
        q = np.ascontiguousarray(queries.detach().cpu().float().numpy())
        return self.engine.search(q, n, params=params)[1] + 1  # faiss ids are rows of table[1:]; -1 (none) -> 0

    def search(self, queries: torch.Tensor, k: int, exclude: Sequence[np.ndarray] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query, the min(k, V + 1) best items (values, columns), best first, exclude[i] never among them.

        The shapes of `scoring.blocked_top_k`; rows the index answers short are scored exactly.
        """
        queries = queries.detach().float().cpu()
        exclude = [np.unique(np.asarray(e, np.int64)) for e in exclude] if exclude is not None else \
            [np.zeros(0, np.int64)] * len(queries)
        items = self.table.shape[0] - 1
        k = min(k, items + 1)
        values = torch.full((len(queries), k), -torch.inf)
        columns = torch.zeros((len(queries), k), dtype=torch.long)
        # k + |history| candidates each, searched in groups of the same power of two (one long history
        # does not widen the whole batch's search)
        need = np.minimum(items, k + np.array([len(e) for e in exclude], dtype=np.int64))
        group = np.minimum(items, 2 ** np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))
        for n in np.unique(group):
            rows = torch.from_numpy(np.flatnonzero(group == n))
            values[rows], columns[rows] = rerank(self.table, queries[rows], self.candidates(queries[rows], int(n)),
                                                 [exclude[i] for i in rows.tolist()], k)
        wanted = [min(k, items - int(((e >= 1) & (e <= items)).sum())) for e in exclude]
        short = torch.from_numpy(np.flatnonzero(torch.isfinite(values).sum(1).numpy() < np.asarray(wanted)))
        if len(short):  # the graph missed items: score those rows exactly
            exact = scoring.blocked_top_k(scoring.DotScores(queries[short].float(), self.table), k,
                                          [exclude[i] for i in short.tolist()])
            values[short], columns[short] = exact
        return values, columns

    def save(self, folder: Path) -> None:
        """index.faiss and ann.json in `folder`, each written beside its name, fsynced and renamed."""
        faiss = faiss_module()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{INDEX_FILE}.tmp-{os.getpid()}"
        faiss.write_index(self.engine, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / INDEX_FILE)
        rundir.write_json_durable(folder / META_FILE, self.meta)


def build(table: torch.Tensor, vocab: str | None, queries: torch.Tensor | None = None,
          exclude: Sequence[np.ndarray] | None = None, ef_search: int = EF_SEARCH, seed: int = 0) -> Index:
    """An HNSW index over table[1:], its recall@10 measured on (up to RECALL_QUERIES of) `queries`.

    `vocab` is the vocabulary digest of the model's items (raykd.core.rundir.vocab_digest); the
    recall sample is drawn with `seed`, each query excluding exclude[i] as a request would.
    """
    faiss = faiss_module()
    table = table.detach().float().cpu()
    x = np.ascontiguousarray(table[1:].numpy())
    engine = faiss.IndexHNSWFlat(x.shape[1], LINKS, faiss.METRIC_INNER_PRODUCT)
    engine.hnsw.efConstruction = EF_CONSTRUCTION
    start = last = time.monotonic()
    for lo in range(0, len(x), ADD_ROWS):
        engine.add(x[lo:lo + ADD_ROWS])
        if time.monotonic() - last > PROGRESS_S and lo + ADD_ROWS < len(x):
            last = time.monotonic()
            done = lo + ADD_ROWS
            console.say(f"ann: {done:,} of {len(x):,} items indexed, {last - start:.0f} s, "
                        f"ETA {(last - start) * (len(x) - done) / done:.0f} s")
    meta = {"library": "faiss", "faiss": faiss.__version__, "kind": "hnsw-ip", "links": LINKS,
            "ef_construction": EF_CONSTRUCTION, "ef_search": ef_search, "items": len(x), "dim": x.shape[1],
            "vocab_digest": vocab, "table_digest": table_digest(table), "build_s": round(time.monotonic() - start, 2)}
    index = Index(engine, table, meta)
    if queries is not None and len(queries):
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(queries), min(len(queries), RECALL_QUERIES), replace=False))
        sample = [exclude[i] for i in rows] if exclude is not None else None
        meta["recall@10"] = round(measure_recall(index, queries[rows], sample), 4)
        meta["recall_queries"], meta["recall_seed"] = len(rows), seed
    return index


def measure_recall(index: Index, queries: torch.Tensor, exclude: Sequence[np.ndarray] | None = None,
                   k: int = RECALL_K) -> float:
    """recall@k of the index's answers against exact blocked scoring, the same exclusions on both."""
    truth = scoring.blocked_top_k(scoring.DotScores(queries.float(), index.table), k, exclude)[1]
    found = index.search(queries, k, exclude)[1]
    return recall_at(found.numpy(), truth.numpy())


def load(folder: Path, table: torch.Tensor, vocab: str | None) -> Index:
    """The index saved in `folder`, refused unless it was built from this table and vocabulary."""
    faiss = faiss_module()
    meta = rundir.read_json(folder / META_FILE)
    if not meta or not (folder / INDEX_FILE).is_file():
        raise RaykdError(f"{folder} holds no approximate index ({INDEX_FILE} and {META_FILE}): export the bundle "
                         "again with `raykd export RUN_DIR --out DIR --ann`")
    if vocab and meta.get("vocab_digest") != vocab:
        raise RaykdError(f"the approximate index in {folder} was built for item vocabulary {meta.get('vocab_digest')}, "
                         f"but the model's is {vocab}: it would answer with the wrong items. Export the bundle "
                         "again with `raykd export RUN_DIR --out DIR --ann`")
    if meta.get("table_digest") != (now := table_digest(table)):
        raise RaykdError(f"the approximate index in {folder} was built from another item table (digest "
                         f"{meta.get('table_digest')}, the model's is {now}: another model or a retrained one): "
                         "export the bundle again with `raykd export RUN_DIR --out DIR --ann`")
    return Index(faiss.read_index(str(folder / INDEX_FILE)), table, meta)


def sample_queries(model: torch.nn.Module, desc: dict, data_dir: Path | None, seed: int = 0,
                   n: int = RECALL_QUERIES) -> tuple[torch.Tensor, list[np.ndarray]]:
    """(hidden states, histories) of a seeded sample of n users of `data_dir`'s sequences (their whole
    known history, as served), or of seeded random histories when it holds none (a bundle without them)."""
    rng = np.random.default_rng(seed)
    if data_dir is not None and (Path(data_dir) / "sequences").is_dir():
        users = sequences.num_users(data_dir)
        split = sequences.read_split(data_dir, np.sort(rng.choice(users, min(n, users), replace=False)))
        hists = [np.concatenate([t, [v, s]]).astype(np.int64)
                 for t, v, s in zip(split["train"], split["valid"], split["test"])]
    else:
        lengths = rng.integers(1, desc["max_len"] + 1, n)
        hists = [rng.integers(1, desc["num_items"] + 1, m).astype(np.int64) for m in lengths]
    with torch.no_grad():
        dot = scoring.dot_scores(model, models.left_pad(hists, desc["max_len"]))
    if dot is None:
        raise RaykdError(f"the approximate index needs a model that scores by a dot product with its item table "
                         f"(sasrec, gru); {desc.get('family')} does not: serve it with exact scoring")
    return dot.queries, hists


def load_or_build(model_dir: Path, model: torch.nn.Module, desc: dict, vocab: str | None,
                  data_dir: Path | None = None) -> Index:
    """The model's index: its folder's `ann/` (an exported bundle) when there, checked against the model's
    table and vocabulary; else built now from `model.item_table()` (minutes at 1M items: export a bundle
    with --ann to build it once), its recall@10 measured on a seeded sample of `data_dir`'s users."""
    table = model.item_table().detach().float().cpu()
    if (Path(model_dir) / INDEX_DIR / META_FILE).exists():
        return load(Path(model_dir) / INDEX_DIR, table, vocab)
    queries, hists = sample_queries(model, desc, data_dir)
    console.say(f"ann: building the approximate index of {table.shape[0] - 1:,} items (export a bundle with "
                "--ann to build it once)")
    return build(table, vocab, queries, hists)
