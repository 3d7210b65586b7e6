"""soft_labels: the teacher's top-K items and logits for every training position.

Reads `<run>/data/` and `<run>/teacher/` (plus `<run>/teacher_ensemble/*` with `teacher.ensemble`, whose
members' log-probabilities are averaged) (or external scores, `distill.teacher_scores`); writes `<run>/soft_labels/part-*.parquet` (one file per
sequence shard, rows in (user, t) order: user int32, t int32, idx K×int32, logits K×float16, rest
float32 = log Σ exp(logit) over every item outside the top K, for the whole-catalogue KL) and
`manifest.json` (rows, rows/s, bytes per row, K, the teacher it came from).

Scoring runs on a Ray Data actor pool (`soft_labels.num_workers` actors, a GPU each when
`use_gpu`), each actor loading the teacher once and taking whole sequence shards: it scores a
shard in fixed chunks of `soft_labels.batch_size` windows (one forward pass each), in position
order, and writes that shard's file itself, row group by row group, saying its progress every
30 s. The driver receives one small row per finished shard and holds no scores, and the files are
identical whatever the number of workers. Up to one actor per shard is busy at a time (`data.num_shards`; ~12.5k users a shard).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from raykd.config import Config, section_hash
from raykd.core import console, models, rundir, sequences, soft_targets
from raykd.core.errors import RaykdError
from raykd.data import teacher_scores

PROGRESS_S = 20.0  # an actor's progress line at most this often (two actors' lines then never leave 30 s of silence)


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
    with rundir.staged(out) as tmp:
        n, size = score_all(shards, members, teacher["max_len"], top_k, cfg.soft_labels.num_workers,
                            cfg.soft_labels.use_gpu, cfg.soft_labels.batch_size, tmp)
        seconds = time.perf_counter() - t0
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


class ShardScorer:
    """Ray Data actor: loads the teacher once; for each sequence shard it is handed, scores every
    training position chunk by chunk and writes that shard's soft-label file itself.

    Windows are scored in order of their first position (each window covers a contiguous run of one
    user's positions), so every chunk's rows follow the previous chunk's and the file is written row
    group by row group: an actor holds one shard's windows, one chunk's scores (tiled: independent
    of the catalogue's size) and one buffered row group, and nothing goes back to the driver but one
    summary row per shard. Several teacher folders (an ensemble) are scored as one: the mean of
    their log-probabilities (models.Ensemble); a single teacher's raw logits are kept as they are.
    """

    ROW_GROUP = 65_536  # rows buffered before a row group is written (about 40 MB at K = 100)

    def __init__(self, teacher_dir: str | list[str], max_len: int, top_k: int, use_gpu: bool, chunk: int, out: str):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        dirs = [teacher_dir] if isinstance(teacher_dir, str | Path) else list(teacher_dir)
        self.members = [models.load_model(d, self.device)[0] for d in dirs]
        with torch.no_grad():  # once: a text teacher's table is a product over the catalogue, a PQ one a gather
            self.tables = [m.item_table().float().contiguous() for m in self.members]
        self.max_len, self.top_k, self.chunk, self.out = max_len, top_k, chunk, Path(out)

    def __call__(self, batch: dict):
        for shard in batch["shard"]:
            yield from self.write_shard(Path(shard))

    def write_shard(self, shard: Path):
        """Score `shard` into `out/<shard name>` (written aside, then renamed); yields one summary row.

        The actor says its own progress (a line every PROGRESS_S seconds, through Ray's output to
        the driver's console): Ray Data hands a task's small outputs on only when the task ends."""
        seqs = pq.read_table(shard, columns=["user", "train"])
        w = sequences.windows(seqs["train"].combine_chunks(), self.max_len)
        users = seqs["user"].to_numpy().astype(np.int32)
        order = position_order(w["pos"])
        path = self.out / shard.name
        tmp = path.with_name(f".{path.name}.tmp")  # a retried shard overwrites its own leftovers
        done, total, t0, throttle = 0, len(w["t"]), time.perf_counter(), console.Throttle(PROGRESS_S)
        with pq.ParquetWriter(tmp, _schema(self.top_k), compression="zstd") as writer:
            pending = []
            for start in range(0, len(order), self.chunk):
                rows = order[start:start + self.chunk]
                r = self._score(w["input"][rows], w["pos"][rows])
                if not np.array_equal(r["pos"], np.arange(done, done + len(r["pos"]))):
                    raise RaykdError(f"soft labels for {shard}: positions out of order at {done}")
                pending.append(_table(users[w["user"][r["pos"]]], w["t"][r["pos"]], r, self.top_k))
                done += len(r["pos"])
                if sum(t.num_rows for t in pending) >= self.ROW_GROUP or start + self.chunk >= len(order):
                    writer.write_table(pa.concat_tables(pending))
                    pending = []
                if throttle.due() and done < total:
                    rate = done / max(time.perf_counter() - t0, 1e-9)
                    console.say(console.progress(f"soft_labels: {shard.name}", done, total, t0, "positions")
                                + f", {rate:,.0f}/s")
        if done != total:
            raise RaykdError(f"soft labels for {shard}: scored {done} positions, expected {total}")
        os.replace(tmp, path)
        yield {"shard": [str(shard)], "positions": [done], "bytes": [path.stat().st_size]}

    @torch.no_grad()
    def _score(self, windows: np.ndarray, pos: np.ndarray) -> dict:
        inp = torch.as_tensor(windows, dtype=torch.long, device=self.device)
        real = torch.as_tensor(pos >= 0, device=self.device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with amp:
            hidden = [m(inp)[real] for m in self.members]
        # The item-table product runs in fp32: under bf16 autocast the logits keep only ~3
        # significant digits (coarser than the float16 they are stored as), so GPU soft labels
        # would differ from CPU ones and near-tied top-K items reorder.
        # Scored in tiles of positions x items (soft_targets): memory does not grow with the catalogue.
        values, indices, rest = soft_targets.top_k_and_rest(
            [h.float() for h in hidden], self.tables, self.top_k)
        return {"pos": pos[pos >= 0], "idx": indices.int().cpu().numpy(),
                "logits": values.cpu().numpy().astype(np.float16), "rest": rest.cpu().numpy().astype(np.float32)}


def position_order(pos: np.ndarray) -> np.ndarray:
    """Windows (rows of `pos`, -1 = padding) sorted by their first position: as each window holds a
    contiguous run of one user's positions, their real slots then come out in position order."""
    return np.argsort(np.where(pos >= 0, pos, np.iinfo(np.int64).max).min(1), kind="stable")


def score_all(shards: list[Path], teacher_dir: Path | list[Path], max_len: int, top_k: int, workers: int,
              use_gpu: bool, chunk: int, out: Path) -> tuple[int, int]:
    """Score every training position into `out` (one file per sequence shard, written by the actors);
    returns (rows, bytes). Up to one actor per shard works at a time (`data.num_shards` sets how many)."""
    total = sum(_count_positions(s) for s in shards)
    if not total:
        raise RaykdError("no training positions to score: every user's training sequence is a single item")
    ds = ray.data.from_items([{"shard": str(s)} for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(
        ShardScorer,
        fn_constructor_kwargs={"teacher_dir": [str(Path(d).resolve()) for d in _as_list(teacher_dir)],
                               "max_len": max_len, "top_k": top_k, "use_gpu": use_gpu, "chunk": chunk,
                               "out": str(Path(out).resolve())},
        compute=ray.data.ActorPoolStrategy(min_size=min(workers, len(shards)), max_size=min(workers, len(shards))),
        batch_size=1,
        num_gpus=1 if use_gpu else 0,
        num_cpus=0.5 if use_gpu else 1,
        batch_format="numpy",
    )
    done, size, t0 = 0, 0, time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):  # a row per finished shard
        done += int(batch["positions"].sum())
        size += int(batch["bytes"].sum())
        console.say(console.progress("soft_labels", done, total, t0, "positions") + " (shards done)")
    if done != total:
        raise RaykdError(f"soft labels: scored {done:,} positions, expected {total:,}")
    return done, size


def score_here(teacher_dirs: list[Path], data_dir: Path, out: Path, top_k: int, chunk: int = 256) -> tuple[int, int]:
    """The soft labels of every training position, scored in this process without Ray (benchmarks,
    notebooks): the same scorer, chunks and files as the stage. Returns (rows, bytes) written to `out`."""
    max_len = _teacher_meta(Path(teacher_dirs[0]))["max_len"]
    Path(out).mkdir(parents=True, exist_ok=True)
    scorer = ShardScorer([str(d) for d in teacher_dirs], max_len, top_k, False, chunk, str(out))
    progress = [row for shard in sequences.shard_paths(data_dir) for row in scorer.write_shard(shard)]  # one a shard
    return sum(r["positions"][0] for r in progress), sum(r["bytes"][0] for r in progress)


def _as_list(dirs: Path | list[Path]) -> list[Path]:
    return [dirs] if isinstance(dirs, str | Path) else list(dirs)


def _count_positions(shard: Path) -> int:
    lengths = pq.read_table(shard, columns=["train"])["train"].combine_chunks().value_lengths().to_numpy()
    return int(np.maximum(lengths - 1, 0).sum())


def write(rows: dict[str, dict], shards: list[Path], out: Path, top_k: int) -> tuple[int, int]:
    """Rows already in memory (external scores), one Parquet file per sequence shard; returns (rows, bytes)."""
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
        path = out / shard.name
        pq.write_table(_table(w_users, t, r, top_k), path, compression="zstd")
        total += n
        size += path.stat().st_size
    return total, size


def _schema(top_k: int, rest: bool = True) -> pa.Schema:
    """The soft-label file's columns (the module docstring describes them)."""
    fields = [("user", pa.int32()), ("t", pa.int32()), ("idx", pa.list_(pa.int32(), top_k)),
              ("logits", pa.list_(pa.float16(), top_k))]
    return pa.schema(fields + ([("rest", pa.float32())] if rest else []))


def _table(users: np.ndarray, t: np.ndarray, r: dict, top_k: int) -> pa.Table:
    """Rows of one shard: `r` holds idx [n, K], logits [n, K] and, from a raykd teacher, rest [n]."""
    cols = [pa.array(users.astype(np.int32)), pa.array(t.astype(np.int32)),
            pa.FixedSizeListArray.from_arrays(pa.array(r["idx"].ravel(), pa.int32()), top_k),
            pa.FixedSizeListArray.from_arrays(pa.array(r["logits"].ravel(), pa.float16()), top_k)]
    if "rest" in r:  # external scores cover only their own top-K: no rest column
        cols.append(pa.array(r["rest"].astype(np.float32)))
    return pa.Table.from_arrays(cols, schema=_schema(top_k, "rest" in r))
