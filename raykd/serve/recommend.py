"""recommend: the top k items for every prepared user (or a list of them), as Parquet, on Ray Data.

    raykd recommend RUN_DIR --k 10 --out recs.parquet [--users FILE] [--no-exclude-seen]
                    [--model DIR] [--workers N] [--use-gpu]

RUN_DIR is a run directory (its tune winner, else `student/`), a model folder, or a bundle from
`raykd export --with-histories`; `--model` picks another model folder of the run. Output: one
Parquet file with `user_id` (the raw id, of the input data's type), `items` (raw item ids, best
first) and `scores`, one row per user in the prepared user order. Users are read from the
sequence shards in fixed chunks of `--batch-size` (one forward pass each) scored on a Ray Data
actor pool (`--workers` actors, a GPU each with `--use-gpu`), each loading the model once and
answering through `Recommender.recommend_many`, so a row is exactly what
`POST /recommend {"user_id": ..., "k": ..., "exclude_seen": ...}` answers. Chunks come back in
order and are appended to the file as they arrive (the driver holds one chunk at a time), so
the file does not depend on the number of workers. Listed ids that are not prepared users go to
`<out>.unknown_users.csv`, with a count, once the output is whole. Both files are written to names
of this run's own and renamed at the end: concurrent runs into one --out, or a run that fails or
is killed, never leave a mixed or truncated file.

This module is imported to build the CLI: Ray and torch are imported inside `main` only.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import uuid
from pathlib import Path

from raykd.core import console, rundir
from raykd.core.errors import RaykdError

UNKNOWN_SUFFIX = ".unknown_users.csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (its tune winner, else student/), model folder, or a bundle "
                   "exported with --with-histories")
    p.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    p.add_argument("--out", required=True, help="output Parquet file: user_id, items, scores")
    p.add_argument("--users", help="only these raw user ids: a text file (one id a line), or a CSV or Parquet "
                   "file whose user_id column (or only column) holds them; default: every prepared user")
    p.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=True,
                   help="never recommend an item of the user's history (default: on)")
    p.add_argument("--model", help="model folder to use instead of the run's own (e.g. RUN_DIR/teacher)")
    p.add_argument("--workers", type=int, default=1, help="scoring actors (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each actor reserves and its torch "
                   "threads (default 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--batch-size", type=int, default=256, help="users per forward pass (default 256)")


def main(args: argparse.Namespace) -> int:
    """`raykd recommend`: plan the chunks, score them on the actor pool, write the file as they come."""
    check_args(args)
    from raykd.serve.recommender import resolve_student

    model_dir = resolve_student(args.model or args.run_dir).resolve()
    data_dir = users_data_dir(Path(args.run_dir), model_dir)
    chunks, total, unknown = plan(data_dir, args.batch_size, args.users)
    console.say(f"recommend: top-{args.k} from {model_dir} for {total:,} users, {len(chunks):,} chunks of "
                f"{args.batch_size} on {args.workers} worker(s){' with a GPU each' if args.use_gpu else ''}")
    from raykd.cluster import runtime

    t0 = time.perf_counter()
    with runtime.run_logs(rundir.logs_of(Path(args.run_dir), "recommend")):  # Ray's lines to the logs
        tables = score(chunks, model_dir, data_dir, args) if chunks else iter(())  # no user: no Ray
        written = write(tables, schema(data_dir), Path(args.out), total, t0)
    if args.users:  # only once the output is whole: a failed run leaves no side file of its own
        report_unknown(unknown, total, args.out)
    seconds = time.perf_counter() - t0
    console.emit(f"recommend: wrote {written:,} users to {os.path.abspath(args.out)} in {seconds:.1f}s "
                 f"({written / max(seconds, 1e-9):,.0f} users/s)", console.QUIET)
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before Ray starts."""
    for name in ("k", "workers", "batch_size"):
        if getattr(args, name) < 1:
            raise RaykdError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.cpus_per_worker <= 0:
        raise RaykdError(f"--cpus-per-worker must be positive, got {args.cpus_per_worker}")
    if os.path.isdir(args.out):
        raise RaykdError(f"--out {args.out} is a folder; give a file name such as {args.out}/recs.parquet")
    if args.users and not os.path.isfile(args.users):
        raise RaykdError(f"--users {args.users}: no such file; give a text, CSV or Parquet file of raw user ids")


def unknown_users_path(out: str | Path) -> Path:
    """Where the listed user ids that are not prepared users go: `<out without .parquet>.unknown_users.csv`."""
    out = Path(out)
    stem = out.name.removesuffix(".parquet")
    return out.with_name(stem + UNKNOWN_SUFFIX)


def temporary_name(path: Path) -> Path:
    """A name in `path`'s folder that no other run uses (process id + random), for an atomic rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.partial")


def progress(done: int, total: int, t0: float) -> str:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    return f"recommend: {done:,}/{total:,} users ({100 * done / max(total, 1):.0f}%), {rate:,.0f} users/s"


# ---------------------------------------------------------------- what to score


def users_data_dir(run_dir: Path, model_dir: Path) -> Path:
    """The prepared users and histories: RUN_DIR/data, RUN_DIR itself (a bundle), else the model's run's data/."""
    from raykd.serve.recommender import find_data_dir

    found = [c for c in (run_dir / "data", run_dir) if (c / rundir.ITEMS).exists()]
    data = found[0] if found else find_data_dir(model_dir)
    if not (data / rundir.USERS).exists() or not list((data / "sequences").glob("part-*.parquet")):
        raise RaykdError(f"{data} holds no user histories (users.parquet and sequences/), and recommend scores the "
                         "users it knows: give a run directory, or a bundle exported with "
                         "`raykd export RUN_DIR --out DIR --with-histories`")
    return data.resolve()


def plan(data_dir: Path, batch: int, users_file: str | None) -> tuple[list[dict], int, list]:
    """Fixed chunks of shard rows to score: (chunks, users in them, listed ids that are not prepared users).

    A chunk is one shard's rows start..stop, or its listed `rows`; the same chunks whatever the workers.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from raykd.core import sequences

    wanted, unknown = (None, [])
    if users_file:
        wanted, unknown = match_users(read_user_list(users_file), data_dir)
    chunks, total = [], 0
    for shard in sequences.shard_paths(data_dir):
        if wanted is None:  # every row: ranges, no row lists
            n = pq.ParquetFile(shard).metadata.num_rows
            chunks += [{"shard": str(shard), "start": s, "stop": min(s + batch, n), "rows": []}
                       for s in range(0, n, batch)]
            total += n
            continue
        rows = np.flatnonzero(np.isin(pq.read_table(shard, columns=["user"])["user"].to_numpy(), wanted))
        chunks += [{"shard": str(shard), "start": 0, "stop": 0, "rows": rows[s:s + batch].tolist()}
                   for s in range(0, len(rows), batch)]
        total += len(rows)
    return chunks, total, unknown


def read_user_list(path: str) -> list:
    """Raw user ids of a text file (one a line), or of a CSV/TSV or Parquet file's user_id (or only) column.

    Read as prepare reads ids (raykd.core.ids rule 1): a UTF-8 byte-order mark is not part of the
    first id, only ASCII whitespace is stripped (a non-breaking space stays), and Parquet integers
    are read as Arrow integers, never through float64, which rounds ids above 2**53.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    from raykd.core import ids

    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv", ".parquet"):
        try:
            table = pq.read_table(path) if suffix == ".parquet" else pd.read_csv(
                path, dtype=str, keep_default_na=False, encoding="utf-8-sig", sep="\t" if suffix == ".tsv" else ",")
        except (OSError, ValueError) as err:
            raise RaykdError(f"--users {path} cannot be read as {suffix[1:]}: {str(err)[:200]}") from None
        cols = list(table.columns) if suffix != ".parquet" else table.column_names
        if "user_id" not in cols and len(cols) != 1:
            raise RaykdError(f"--users {path} has columns {cols[:10]}: name the column of user ids user_id, or "
                             "give a file with that column alone")
        column = table["user_id" if "user_id" in cols else cols[0]]
        values = column.to_pylist() if suffix == ".parquet" else column.tolist()
    else:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            values = [line.strip(ids.WHITESPACE) for line in f]
    return [_as_id(v) for v in values if v is not None and v != "" and not (isinstance(v, float) and math.isnan(v))]


def _as_id(value: object) -> int | str:
    if isinstance(value, float) and value.is_integer():  # raykd.core.ids rule 2: whole floats are integers
        return int(value)
    return value if isinstance(value, int | str) and not isinstance(value, bool) else str(value)


def match_users(raw: list, data_dir: Path) -> tuple[list[int], list]:
    """Listed raw ids -> (user indices, each once, in list order; the ids that are not prepared users)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raykd.core import ids

    users = pq.read_table(data_dir / rundir.USERS, columns=["raw_id"])
    int_users = pa.types.is_integer(users.schema.field("raw_id").type)
    index = {u: i for i, u in enumerate(users["raw_id"].to_pylist())}
    wanted, unknown, seen = [], [], set()
    for value in raw:
        user = index.get(ids.lookup_key(value, int_users))
        if user is None:
            unknown.append(value)
        elif user not in seen:
            seen.add(user)
            wanted.append(user)
    return wanted, unknown


def report_unknown(unknown: list, known: int, out: str) -> None:
    """List the ids that are not prepared users in the side file (or remove a stale one), with a count.

    Called once the output is written; the file is written to a temporary name and renamed."""
    path = unknown_users_path(out)
    if not unknown:
        path.unlink(missing_ok=True)
        console.say(f"recommend: all {known:,} listed users are prepared users")
        return
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        pd.DataFrame({"user_id": [str(u) for u in unknown]}).to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    console.warn(f"recommend: {len(unknown):,} listed user id(s) are not prepared users (no history to score), "
                 f"listed in {path}; {known:,} known")


def schema(data_dir: Path):
    """Output columns: raw user id and raw item ids of the prepared data's own types, scores as doubles."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    user_type = pq.read_schema(data_dir / rundir.USERS).field("raw_id").type
    item_type = pq.read_schema(data_dir / rundir.ITEMS).field("raw_id").type
    return pa.schema([("user_id", user_type), ("items", pa.list_(item_type)), ("scores", pa.list_(pa.float64()))])


# ---------------------------------------------------------------- scoring on Ray Data


class UserScorer:
    """Ray Data actor: loads the model once through Recommender, answers one chunk of a shard's users a call."""

    def __init__(self, model_dir: str, data_dir: str, k: int, exclude_seen: bool, use_gpu: bool, threads: int,
                 digest: str | None = None):
        import pyarrow.parquet as pq
        import torch

        from raykd.serve.recommender import Recommender

        torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.rec = Recommender(model_dir, max_k=k, data_dir=data_dir, with_histories=False, device=device,
                               model_digest=digest)  # every actor the version the driver saw
        self.raw_users = pq.read_table(Path(data_dir) / rundir.USERS, columns=["raw_id"])["raw_id"]
        self.schema = schema(Path(data_dir))
        self.k, self.exclude = k, exclude_seen
        self.cached: tuple = (None, None)  # the last shard read: a shard's chunks arrive in order

    def __call__(self, batch: dict):
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        shard, rows = str(batch["shard"][0]), np.asarray(batch["rows"][0], dtype=np.int64)
        if not len(rows):  # a range of the shard's rows
            rows = np.arange(int(batch["start"][0]), int(batch["stop"][0]))
        if self.cached[0] != shard:
            self.cached = (shard, pq.read_table(shard))
        table = self.cached[1].take(rows)
        answers = self.rec.recommend_many([(h, [], self.k, self.exclude) for h in shard_histories(table)])
        return pa.table({"user_id": self.raw_users.take(table["user"]),
                         "items": pa.array([a["items"] for a in answers], self.schema.field("items").type),
                         "scores": pa.array([a["scores"] for a in answers], self.schema.field("scores").type)},
                        schema=self.schema)


def shard_histories(table) -> list:
    """Each row's whole known history, exactly as the serving Recommender keeps it for `user_id` requests."""
    from raykd.serve.recommender import full_history

    train = table["train"].combine_chunks()
    offsets, values = train.offsets.to_numpy(), train.values.to_numpy()
    return [full_history(values[a:b], v, t) for a, b, v, t in
            zip(offsets[:-1], offsets[1:], table["valid"].to_numpy(), table["test"].to_numpy())]


def score(chunks: list[dict], model_dir: Path, data_dir: Path, args: argparse.Namespace):
    """Answer the chunks on a fixed-size actor pool; yields one Arrow table per chunk, in chunk order."""
    import ray
    import ray.data

    from raykd.cluster.runtime import ensure_ray
    from raykd.serve.recommender import model_digest

    digest = model_digest(model_dir)
    ensure_ray(ray_config(Path(args.run_dir)))
    check_resources(args)
    ctx = ray.data.DataContext.get_current()
    keep, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        ds = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), 512)).map_batches(
            UserScorer,
            fn_constructor_kwargs={"model_dir": str(model_dir), "data_dir": str(data_dir), "k": args.k,
                                   "exclude_seen": args.exclude_seen, "use_gpu": args.use_gpu,
                                   "threads": max(1, int(args.cpus_per_worker)), "digest": digest},
            compute=ray.data.ActorPoolStrategy(size=args.workers), batch_size=1, batch_format="numpy",
            num_cpus=args.cpus_per_worker, num_gpus=1 if args.use_gpu else 0)
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    finally:
        ctx.execution_options.preserve_order = keep


def ray_config(run_dir: Path):
    """The run's `ray` section (config.yaml) when it has one, else the defaults."""
    from raykd.config import RayConfig, load_config

    path = run_dir / rundir.CONFIG
    if path.is_file():
        try:
            return load_config(path).ray
        except RaykdError as err:
            console.warn(f"recommend: {path} not used ({str(err).splitlines()[0]}); default Ray settings")
    return RayConfig()


def check_resources(args: argparse.Namespace) -> None:
    """Fail on a GPU the cluster lacks and warn on too few CPUs (Ray would wait without a word)."""
    import ray

    res = ray.cluster_resources()
    if args.use_gpu and res.get("GPU", 0) < 1:
        raise RaykdError("--use-gpu but the Ray cluster has no GPU: drop --use-gpu, or join a cluster with GPU nodes")
    if args.workers * args.cpus_per_worker > res.get("CPU", 0) + 1e-9:
        console.warn(f"recommend: {args.workers} worker(s) x {args.cpus_per_worker:g} CPU > the cluster's "
                     f"{res.get('CPU', 0):g} CPU: Ray waits until they fit; lower --workers or --cpus-per-worker")


def write(tables, out_schema, out: Path, total: int, t0: float, rows_per_group: int = 65536) -> int:
    """Append the tables to one Parquet file (written to a temporary name, renamed when whole).

    The temporary name is this run's own, so runs into the same --out never write one file: the
    last to finish leaves its whole output, and a run that fails or is killed leaves the old one.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(out)
    written, pending, next_print = 0, [], time.perf_counter() + 10
    try:
        with pq.ParquetWriter(tmp, out_schema, compression="zstd") as writer:
            for table in tables:
                pending.append(table)
                written += table.num_rows
                if sum(t.num_rows for t in pending) >= rows_per_group:
                    writer.write_table(pa.concat_tables(pending))
                    pending = []
                if time.perf_counter() > next_print:
                    console.say(progress(written, total, t0))
                    next_print = time.perf_counter() + 10
            if pending:
                writer.write_table(pa.concat_tables(pending))
        if written != total:
            raise RaykdError(f"scored {written:,} users but planned {total:,}; nothing written to {out}: rerun")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return written
