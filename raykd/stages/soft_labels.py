"""soft_labels: the teacher's top-K items and logits for every training position.

Reads `<run>/data/` and `<run>/teacher/` (plus `<run>/teacher_ensemble/*` with `teacher.ensemble`, whose
members' log-probabilities are averaged) (or external scores, `distill.teacher_scores`); writes `<run>/soft_labels/part-*.parquet` (one file per
sequence shard, rows in (user, t) order: user int32, t int32, idx K×int32, logits K×float16, rest
float32 = log Σ exp(logit) over every item outside the top K, for the whole-catalogue KL) and
`manifest.json` (rows, rows/s, bytes per row, K, the teacher it came from).

Scoring runs on a Ray Data actor pool (`soft_labels.num_workers` actors, a GPU each when
`use_gpu`), each actor loading the teacher once. Work is cut into fixed chunks of
`soft_labels.batch_size` windows (one forward pass each) that do not depend on the number of workers, and rows are sorted back into position order before
writing, so the files are identical whatever the number of workers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from raykd.config import Config, section_hash
from raykd.core import models, rundir, sequences, soft_targets
from raykd.core.errors import RaykdError
from raykd.data import teacher_scores


def run(cfg: Config) -> dict:
    root = Path(cfg.output_dir)
    data_dir, out = root / rundir.DATA, root / rundir.SOFT_LABELS
    upstream = {rundir.DATA: rundir.require(root, rundir.DATA, "soft-labels")}
    if cfg.distill.teacher_scores:
        info = import_external(Path(cfg.distill.teacher_scores), data_dir, out, upstream)
    else:
        members = [rundir.member(i) for i in range(cfg.teacher.ensemble)]
        upstream |= {m: rundir.require(root, m, "soft-labels") for m in members}
        info = score_teachers(cfg, [root / m for m in members], data_dir, out, upstream)
    rundir.record(root, rundir.SOFT_LABELS, "soft_labels", list(upstream))
    return info


def score_teachers(cfg: Config, members: list[Path], data_dir: Path, out: Path, upstream: dict) -> dict:
    """Score every training position with the teacher(s) on a Ray Data actor pool; write the shards."""
    teacher = _teacher_meta(members[0])
    top_k = min(cfg.soft_labels.top_k, teacher["num_items"])
    key = "+".join(upstream[m] for m in upstream if m != rundir.DATA) + f"-k{top_k}-rest"
    if rundir.key_of(out) == key:
        print(f"soft_labels: reusing {out} (same teacher and top_k)", flush=True)
        return {**rundir.read_manifest(out), "reused": True}
    shards = sequences.shard_paths(data_dir)
    t0 = time.perf_counter()
    rows = score_all(shards, members, teacher["max_len"], top_k, cfg.soft_labels.num_workers,
                     cfg.soft_labels.use_gpu, cfg.soft_labels.batch_size)
    seconds = time.perf_counter() - t0
    with rundir.staged(out) as tmp:
        n, size = write(rows, shards, tmp, top_k)
        info = {"rows": n, "top_k": top_k, "seconds": seconds, "rows_per_s": n / seconds,
                "bytes_per_row": size / max(n, 1), "workers": cfg.soft_labels.num_workers}
        info = rundir.write_manifest(tmp, key, upstream, section_hash(cfg.soft_labels), **info)
    print(f"soft_labels: {n:,} positions, top-{top_k}, {info['rows_per_s']:,.0f} rows/s, "
          f"{info['bytes_per_row']:.0f} bytes/row (K x 6 = {top_k * 6}) -> {out}", flush=True)
    return info


def import_external(path: Path, data_dir: Path, out: Path, upstream: dict) -> dict:
    """Soft labels from an external teacher's scores (raykd.data.teacher_scores documents the schema)."""
    # the prepared data's key too: the same file over re-prepared data maps to other positions
    key = f"{teacher_scores.fingerprint(path)}-{upstream[rundir.DATA]}"
    if rundir.key_of(out) == key:
        print(f"soft_labels: reusing {out} (same external teacher scores and data)", flush=True)
        return {**rundir.read_manifest(out), "reused": True}
    t0 = time.perf_counter()
    rows, top_k = teacher_scores.load(path, data_dir)
    with rundir.staged(out) as tmp:
        n, size = write(rows, sequences.shard_paths(data_dir), tmp, top_k)
        info = rundir.write_manifest(tmp, key, upstream, rows=n, top_k=top_k, seconds=time.perf_counter() - t0,
                                     bytes_per_row=size / max(n, 1), source=str(path))
    print(f"soft_labels: imported {n:,} positions, top-{top_k}, from external scores {path} -> {out}", flush=True)
    return info


def _teacher_meta(teacher_dir: Path) -> dict:
    try:
        return json.loads((teacher_dir / rundir.MODEL_JSON).read_text())
    except OSError:
        raise RaykdError(f"no teacher in {teacher_dir}: run `raykd teacher CONFIG` first") from None


class TeacherScorer:
    """Ray Data actor: loads the teacher once, scores chunks of windows, keeps the top K.

    Several teacher folders (an ensemble) are scored as one: the mean of their log-probabilities
    (models.Ensemble); a single teacher's raw logits are kept as they are.
    """

    def __init__(self, teacher_dir: str | list[str], max_len: int, top_k: int, use_gpu: bool, chunk: int):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        dirs = [teacher_dir] if isinstance(teacher_dir, str | Path) else list(teacher_dir)
        self.members = [models.load_model(d, self.device)[0] for d in dirs]
        self.model = self.members[0]
        self.max_len, self.top_k, self.chunk = max_len, top_k, chunk
        self.cached: tuple[str, dict] | None = None  # windows of the last shard (chunks come in order)

    def __call__(self, batch: dict) -> dict:
        out = []
        for shard, start in zip(batch["shard"], batch["start"]):
            if self.cached is None or self.cached[0] != shard:
                table = pq.read_table(shard, columns=["train"])["train"].combine_chunks()
                self.cached = (shard, sequences.windows(table, self.max_len))
            w = self.cached[1]
            out.append(self._score(w, int(start)))
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]} | {
            "shard": np.concatenate([[s] * len(o["pos"]) for s, o in zip(batch["shard"], out)])}

    @torch.no_grad()
    def _score(self, w: dict, start: int) -> dict:
        end = start + self.chunk
        inp = torch.as_tensor(w["input"][start:end], dtype=torch.long, device=self.device)
        pos = w["pos"][start:end]
        real = torch.as_tensor(pos >= 0, device=self.device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with amp:
            hidden = [m(inp)[real] for m in self.members]
        # The item-table product runs in fp32: under bf16 autocast the logits keep only ~3
        # significant digits (coarser than the float16 they are stored as), so GPU soft labels
        # would differ from CPU ones and near-tied top-K items reorder.
        # Scored in tiles of positions x items (soft_targets): memory does not grow with the catalogue.
        values, indices, rest = soft_targets.top_k_and_rest(
            [h.float() for h in hidden], [m.item_table() for m in self.members], self.top_k)
        return {"pos": pos[pos >= 0], "idx": indices.int().cpu().numpy(),
                "logits": values.cpu().numpy().astype(np.float16), "rest": rest.cpu().numpy().astype(np.float32)}


def score_all(shards: list[Path], teacher_dir: Path | list[Path], max_len: int, top_k: int, workers: int,
              use_gpu: bool, chunk: int = 256) -> dict[str, dict]:
    """Score every training position; returns per-shard arrays sorted by position."""
    chunks = []
    for shard in shards:
        n_windows = _count_windows(shard, max_len)
        chunks += [{"shard": str(shard), "start": s} for s in range(0, n_windows, chunk)]
    if not chunks:
        raise RaykdError("no training positions to score: every user's training sequence is a single item")
    ds = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), 64))
    ds = ds.map_batches(
        TeacherScorer,
        fn_constructor_kwargs={"teacher_dir": [str(Path(d).resolve()) for d in _as_list(teacher_dir)],
                               "max_len": max_len,
                               "top_k": top_k, "use_gpu": use_gpu, "chunk": chunk},
        compute=ray.data.ActorPoolStrategy(min_size=workers, max_size=workers),
        batch_size=1,
        num_gpus=1 if use_gpu else 0,
        num_cpus=0.5 if use_gpu else 1,
        batch_format="numpy",
    )
    parts: dict[str, list] = {str(s): [] for s in shards}
    done, next_print = 0, time.perf_counter() + 10
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for shard in np.unique(batch["shard"]):
            sel = batch["shard"] == shard
            parts[str(shard)].append({k: batch[k][sel] for k in ("pos", "idx", "logits", "rest")})
        done += len(batch["pos"])
        if time.perf_counter() > next_print:
            print(f"soft_labels: {done:,} positions scored", flush=True)
            next_print = time.perf_counter() + 10
    return _in_position_order(parts)


def score_here(teacher_dirs: list[Path], data_dir: Path, out: Path, top_k: int, chunk: int = 256) -> tuple[int, int]:
    """The soft labels of every training position, scored in this process without Ray (benchmarks,
    notebooks): the same scorer, chunks and files as the stage. Returns (rows, bytes) written to `out`."""
    max_len = _teacher_meta(Path(teacher_dirs[0]))["max_len"]
    shards = sequences.shard_paths(data_dir)
    scorer = TeacherScorer([str(d) for d in teacher_dirs], max_len, top_k, False, chunk)
    parts = {str(shard): [scorer({"shard": np.array([str(shard)]), "start": np.array([start])})
                          for start in range(0, _count_windows(shard, max_len), chunk)] for shard in shards}
    Path(out).mkdir(parents=True, exist_ok=True)
    return write(_in_position_order(parts), shards, Path(out), top_k)


def _in_position_order(parts: dict[str, list[dict]]) -> dict[str, dict]:
    """Each shard's scored chunks joined and sorted back into position order."""
    merged = {}
    for shard, items in parts.items():
        cat = {k: np.concatenate([p[k] for p in items]) for k in ("pos", "idx", "logits", "rest")}
        order = np.argsort(cat["pos"], kind="stable")
        merged[shard] = {k: v[order] for k, v in cat.items()}
    return merged


def _as_list(dirs: Path | list[Path]) -> list[Path]:
    return [dirs] if isinstance(dirs, str | Path) else list(dirs)


def _count_windows(shard: Path, max_len: int) -> int:
    lengths = pq.read_table(shard, columns=["train"])["train"].combine_chunks().value_lengths().to_numpy()
    return int((-(-np.maximum(lengths - 1, 0) // max_len)).sum())


def write(rows: dict[str, dict], shards: list[Path], out: Path, top_k: int) -> tuple[int, int]:
    """One Parquet file per sequence shard; returns (rows, bytes)."""
    total, size = 0, 0
    for shard in shards:
        r = rows[str(shard)]
        train = pq.read_table(shard, columns=["user", "train"])
        w_users = np.repeat(train["user"].to_numpy(),
                            np.maximum(train["train"].combine_chunks().value_lengths().to_numpy() - 1, 0))
        n = len(r["pos"])
        if n != len(w_users) or not np.array_equal(r["pos"], np.arange(n)):
            raise RaykdError(f"soft labels for {shard}: scored {n} positions, expected {len(w_users)}")
        t = np.arange(n) - np.searchsorted(w_users, w_users) + 1
        cols = {
            "user": pa.array(w_users.astype(np.int32)),
            "t": pa.array(t.astype(np.int32)),
            "idx": pa.FixedSizeListArray.from_arrays(pa.array(r["idx"].ravel(), pa.int32()), top_k),
            "logits": pa.FixedSizeListArray.from_arrays(pa.array(r["logits"].ravel(), pa.float16()), top_k),
        }
        if "rest" in r:  # external scores cover only their own top-K: no rest column
            cols["rest"] = pa.array(r["rest"].astype(np.float32))
        table = pa.table(cols)
        path = out / shard.name
        pq.write_table(table, path, compression="zstd")
        total += n
        size += path.stat().st_size
    return total, size
