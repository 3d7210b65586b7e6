"""prepare: interaction logs -> clean, split, sharded training data.

Reads `data` of the config; writes `<run>/data/`:

    sequences/part-*.parquet  user (int32), train (list<int32>), valid (int32), test (int32)
    users.parquet             index (int32) -> raw_id     (users are 0..U-1)
    items.parquet             index (int32) -> raw_id, count (items are 1..I; 0 is padding)
    stats.json                sizes, density, sequence-length percentiles, dropped rows by reason

Ray Data does the parallel, streaming part: reading, parsing and validating every file (or
synthetic chunk) in its own tasks, one block per ~16 MB. The global steps (de-duplication,
iterative k-core, dense ids, time ordering, leave-one-out split) need all rows at once; they run
vectorised (NumPy/Arrow sorts, never a Python call per user) on compact columns in the driver, so
the output is byte-identical whatever the number of workers or blocks.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from raykd.config import Config, DataConfig, section_hash
from raykd.core import console, ids, rundir
from raykd.core.errors import RaykdError
from raykd.data import dates
from raykd.data import readers as logs

USERS_PER_SHARD = 12_500  # a 1M-interaction log (~50k users) in 4 shards: every soft-label actor busy
SOURCE_DONE = "_source_done"  # column of the one-row table that says a source is read


def run(cfg: Config) -> Path:
    """Prepare `cfg.data` into `<output_dir>/data`; reuse it when it exists for the same config and input."""
    root = Path(cfg.output_dir)
    out = root / rundir.DATA
    sources = logs.plan_sources(cfg.data)  # fails fast, before any work
    key = f"{section_hash(cfg.data)}-{_fingerprint(sources)}"
    if rundir.key_of(out) == key:
        print(f"prepare: reusing {out} (same data config and input files)", flush=True)
    else:
        t0 = time.perf_counter()
        table = read_all(sources)
        print(f"prepare: read {table.num_rows:,} rows from {len(sources)} source(s) "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
        result = clean(table, cfg.data, sources)
        with rundir.staged(out) as tmp:  # a killed run never leaves a half-written data/
            write(result, tmp, cfg.data.num_shards)
            rundir.write_manifest(tmp, key, config_hash=section_hash(cfg.data),
                                  vocab_digest=rundir.vocab_digest(result["item_raw"].to_pylist()))
        s = result["stats"]
        print(f"prepare: {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions "
              f"(dropped: {s['dropped'] or 'none'}) -> {out} in {time.perf_counter() - t0:.1f}s", flush=True)
    rundir.record(root, rundir.DATA, "prepare")
    return out


def _fingerprint(sources: list[logs.Source]) -> str:
    """Input files by resolved path and content (readers.fingerprint_files): a changed log is prepared
    again, even one that kept its size and modification time. Synthetic sources have no file: the
    data config (the other half of the key) describes them."""
    paths = [Path(s.path) for s in sources if s.path]
    size = sum(p.stat().st_size for p in paths)
    t0 = time.perf_counter()
    digest = logs.fingerprint_files(paths)
    if size >= 1 << 30:  # seconds worth saying: a few per GiB
        print(f"prepare: fingerprinted {size / (1 << 30):.1f} GiB of input in {time.perf_counter() - t0:.1f}s",
              flush=True)
    return digest[:16]


def read_all(sources: list[logs.Source]) -> pa.Table:
    """Read every source with Ray Data tasks and gather the compact normalised columns.

    One task per source (file or synthetic chunk); a file streams through its task in blocks of
    `block_bytes`. The result does not depend on the order in which blocks arrive: every row
    carries its file order, and `clean` sorts by it.
    """

    def read_batch(batch: dict) -> object:
        for src in batch["source"]:
            source = logs.Source(**json.loads(src))
            yield from logs.read_source(source)
            yield pa.table({SOURCE_DONE: [source.index]})  # progress: this source is read

    items = [{"source": json.dumps(dataclasses.asdict(s))} for s in sources]
    ds = ray.data.from_items(items, override_num_blocks=len(sources))
    ds = ds.map_batches(read_batch, batch_size=1, batch_format="numpy")
    parts, rows, done, start = [], 0, 0, time.perf_counter()
    throttle = console.Throttle(10.0)
    throttle.due()  # the first line after 10 s: short reads print none
    for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if SOURCE_DONE in part.column_names:  # Ray Data may have joined the marker to a data block
            done += int(pc.sum(pc.is_valid(part[SOURCE_DONE])).as_py() or 0)
            part = part.filter(pc.is_null(part[SOURCE_DONE])).drop_columns([SOURCE_DONE])
        if "error" in part.column_names:  # a source could not be read: stop at once
            errors = part.filter(pc.is_valid(part["error"]))
            if errors.num_rows:
                raise RaykdError(errors.sort_by("order")["error"][0].as_py())
            part = part.drop_columns(["error"])
        if part.num_columns:
            parts.append(part)
            rows += part.num_rows
        if throttle.due():  # progress on long reads: sources read of all, rows so far
            console.say(console.progress("prepare", done, len(sources), start, "source(s) read") + f"; {rows:,} rows")
    parts = [p for p in parts if p.num_rows]
    if not parts:
        names = ", ".join(s.path or s.kind for s in sources[:5]) + (" ..." if len(sources) > 5 else "")
        raise RaykdError(f"no data rows in {names}: the input holds no interactions (only a header, or empty "
                         "files); point data.path at a log with rows")
    for name in ("user", "item"):
        if len({p.schema.field(name).type for p in parts}) > 1:  # e.g. int ids in one parquet, text in another
            parts = [p.set_column(p.schema.get_field_index(name), name, p[name].cast(pa.string())) for p in parts]
    return pa.concat_tables(parts).combine_chunks()


def _normalise_ids(table: pa.Table, text: bool) -> tuple[pa.Table, dict[str, int]]:
    """raykd.core.ids rules 1 and 2, decided once over all rows: strip text ids, then pick each vocabulary's type."""
    stripped = {}
    for name in ("user", "item"):
        col, stripped[name] = ids.strip_text(table[name])
        if stripped[name]:  # an id that was only whitespace is now missing
            missing = pc.is_null(col).to_numpy(zero_copy_only=False) & (table["flag"].to_numpy() == logs.FLAG_OK)
            flag = table["flag"].to_numpy().copy()
            flag[missing] = logs.FLAG_NULL_USER if name == "user" else logs.FLAG_NULL_ITEM
            table = table.set_column(table.schema.get_field_index("flag"), "flag", pa.array(flag))
        table = table.set_column(table.schema.get_field_index(name), name, logs.unify_ids(col, text))
    return table, {f"{name}_whitespace_stripped": n for name, n in stripped.items() if n}


def _parse_dates(table: pa.Table, data: DataConfig, sources: list[logs.Source]) -> pa.Table:
    """Date text -> sort keys with one format for the whole column (raykd.data.dates); unreadable: flagged."""
    if "time_text" not in table.column_names:
        return table
    text = table["time_text"].combine_chunks()
    table = table.drop_columns(["time_text"])
    if text.null_count == len(text):
        return table
    column = sources[0].time_col if sources else data.time_col
    try:
        micros = dates.parse(text, data.time_format, column)
    except RaykdError as err:
        raise RaykdError(f"{_describe(data)}: {err}") from None
    is_text = pc.is_valid(text).to_numpy(zero_copy_only=False)
    time = table["time"].to_numpy().copy()
    flag = table["flag"].to_numpy().copy()
    time[is_text] = np.nan_to_num(micros[is_text], nan=0.0)
    flag[is_text & np.isnan(micros) & (flag == logs.FLAG_OK)] = logs.FLAG_BAD_TIME
    table = table.set_column(table.schema.get_field_index("time"), "time", pa.array(time))
    return table.set_column(table.schema.get_field_index("flag"), "flag", pa.array(flag))


def clean(table: pa.Table, data: DataConfig, sources: list[logs.Source] | None = None) -> dict:
    """Validate, filter, de-duplicate, k-core, encode and split; all vectorised and deterministic."""
    total = table.num_rows
    table, normalised = _normalise_ids(table, data.format in ("csv", "movielens"))
    table = _parse_dates(table, data, sources or [])
    flag = table["flag"].to_numpy()
    describe = _describe(data)
    _raise_on_bad_rows(table, flag, data, sources or [])
    has_time = "time" in table.column_names
    if has_time:
        _raise_on_mixed_times(table, flag, data, sources or [])
        _raise_on_mixed_epoch_units(table, data, sources or [])
    dropped: dict[str, int] = {}
    low = int((flag == logs.FLAG_LOW_RATING).sum())
    if low:
        dropped["below_min_rating"] = low
        table = table.filter(pa.array(flag == logs.FLAG_OK))
    if table.num_rows == 0:
        raise RaykdError(f"{describe}: all {total:,} rows have a rating below data.min_rating={data.min_rating}; "
                         "lower data.min_rating or check data.rating_col")

    users_raw, user = _encode(table["user"])
    items_raw, item = _encode(table["item"])
    order = table["order"].to_numpy()
    t = table["time"].to_numpy() if has_time else np.zeros(len(order))
    del table

    # Exact repeats: same user, item and time (without a time column, the same user and item);
    # the first in file order stays.
    idx = np.lexsort((order, t, item, user))
    dup = np.zeros(len(idx), dtype=bool)
    dup[1:] = (user[idx][1:] == user[idx][:-1]) & (item[idx][1:] == item[idx][:-1]) & (t[idx][1:] == t[idx][:-1])
    keep = np.ones(len(idx), dtype=bool)
    keep[idx[dup]] = False
    if dup.any():
        dropped["duplicate"] = int(dup.sum())
    user, item, t, order = user[keep], item[keep], t[keep], order[keep]

    keep = _k_core(user, item, data.min_user_interactions, data.min_item_interactions, dropped)
    user, item, t, order = user[keep], item[keep], t[keep], order[keep]
    if len(user) == 0:
        raise RaykdError(
            f"{describe}: no interactions left after the k-core filter (users need "
            f"{data.min_user_interactions}, items {data.min_item_interactions} interactions; "
            f"{total:,} rows read, dropped {({k: v for k, v in dropped.items() if v})}). Lower data.min_user_interactions (at least 3) / "
            "data.min_item_interactions.")

    users_kept, user = np.unique(user, return_inverse=True)  # dense 0..U-1, raw-id order
    items_kept, item = np.unique(item, return_inverse=True)
    item = item + 1  # 0 is padding
    idx = np.lexsort((order, t, user))  # time order per user, ties keep file order
    user, item = user[idx].astype(np.int32), item[idx].astype(np.int32)
    lengths = np.bincount(user, minlength=len(users_kept))
    return {
        "user_raw": users_raw.take(pa.array(users_kept)),
        "item_raw": items_raw.take(pa.array(items_kept)),
        "items": item,
        "lengths": lengths,
        "stats": {**_stats(total, dropped, lengths, len(items_kept)), "normalised_ids": normalised},
    }


def _describe(data: DataConfig) -> str:
    return f"data.path {data.path}" if data.path else f"data.format {data.format}"


def _where(order: np.ndarray, sources: list[logs.Source], limit: int = 3) -> str:
    """'a.csv line 5, a.csv line 9' for the first rows of a set, by their global file order."""
    by_index = {s.index: s for s in sources}
    out = []
    for o in np.sort(order)[:limit]:
        src = by_index.get(int(o >> logs.ROW_BITS))
        row = int(o & ((1 << logs.ROW_BITS) - 1))
        out.append(src.where(row) if src else f"file #{int(o >> logs.ROW_BITS)} row {row + 1}")
    return ", ".join(out)


def _raise_on_bad_rows(table: pa.Table, flag: np.ndarray, data: DataConfig, sources: list[logs.Source]) -> None:
    bad = (flag != logs.FLAG_OK) & (flag != logs.FLAG_LOW_RATING)
    if not bad.any():
        return
    order = table["order"].to_numpy()
    problems = []
    for f in np.unique(flag[bad]):
        what, setting = logs.FLAG_NAMES[int(f)]
        rows = flag == f
        column = getattr(sources[0], setting, None) if sources else getattr(data, setting)
        every = " (every row: is it the right column?)" if rows.all() else ""
        problems.append(f"{int(rows.sum()):,} with a {what} in column {column!r}{every}, first at "
                        f"{_where(order[rows], sources)}")
    dates_hint = (" Dates are read with one format per column: set data.time_format (e.g. '%d/%m/%Y %H:%M') "
                  "if the column's format was not inferred." if (flag[bad] == logs.FLAG_BAD_TIME).any() else "")
    raise RaykdError(
        f"{_describe(data)}: {int(bad.sum()):,} of {len(flag):,} rows are invalid: {'; '.join(problems)}. "
        "Fix or remove these rows, or check that data.user_col / data.item_col / data.time_col / "
        f"data.rating_col name the right columns.{dates_hint}")


def _raise_on_mixed_times(table: pa.Table, flag: np.ndarray, data: DataConfig, sources: list[logs.Source]) -> None:
    kind = table["time_kind"].to_numpy()
    dates = kind == logs.TIME_DATE
    if dates.all() or not dates.any():
        return
    order = table["order"].to_numpy()
    column = sources[0].time_col if sources else data.time_col
    raise RaykdError(
        f"{_describe(data)}: the time column {column!r} mixes numbers ({int((~dates).sum()):,} rows, first at "
        f"{_where(order[~dates], sources, 2)}) and dates ({int(dates.sum()):,} rows, first at "
        f"{_where(order[dates], sources, 2)}), which cannot be ordered together. Write every timestamp the "
        "same way (all epoch numbers or all dates).")


def _raise_on_mixed_epoch_units(table: pa.Table, data: DataConfig, sources: list[logs.Source]) -> None:
    """Epoch numbers of one column in two units (seconds and milliseconds, say) are an error naming rows:
    read as numbers, every millisecond row would sort after every second row (readers.epoch_units)."""
    numbers = table["time_kind"].to_numpy() == logs.TIME_NUMBER
    unit = logs.epoch_units(table["time"].to_numpy()[numbers])
    present = np.unique(unit[unit >= 0])
    if len(present) < 2:
        return
    order, values = table["order"].to_numpy()[numbers], table["time"].to_numpy()[numbers]
    parts = []
    for u in present:
        rows = np.flatnonzero(unit == u)
        first = rows[np.argmin(order[rows])]
        parts.append(f"epoch {logs.EPOCH_UNITS[u]} ({len(rows):,} row{'s' * (len(rows) > 1)}, first at "
                     f"{_where(order[rows], sources, 2)}; e.g. {values[first]:.15g})")
    column = sources[0].time_col if sources else data.time_col
    raise RaykdError(
        f"{_describe(data)}: the time column {column!r} mixes {' and '.join(parts)}, judged by magnitude (a number "
        "from 1e8 up is read in the unit that dates it between 1973 and 5138). As numbers they would sort "
        "every larger unit after every smaller one and reorder users' histories. Write every timestamp in one "
        "unit (e.g. divide the milliseconds by 1000), or as dates.")


def _encode(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Raw ids -> codes in sorted raw-id order (so codes and vocabularies are deterministic)."""
    uniq = pc.unique(col)
    uniq = uniq.take(pc.sort_indices(uniq))
    return uniq, pc.index_in(col, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)


def _k_core(user: np.ndarray, item: np.ndarray, min_user: int, min_item: int, dropped: dict) -> np.ndarray:
    """Iteratively drop users and items with too few interactions until none remain; return mask."""
    keep = np.ones(len(user), dtype=bool)
    num_users = int(user.max()) + 1 if len(user) else 0
    num_items = int(item.max()) + 1 if len(item) else 0
    while True:
        # minlength: users/items already removed still index the counts (as zero)
        u_count = np.bincount(user[keep], minlength=num_users)
        i_count = np.bincount(item[keep], minlength=num_items)
        low_user = keep & (u_count[user] < min_user)
        low_item = keep & (i_count[item] < min_item) & ~low_user
        if not low_user.any() and not low_item.any():
            return keep
        dropped["k_core_user"] = dropped.get("k_core_user", 0) + int(low_user.sum())
        dropped["k_core_item"] = dropped.get("k_core_item", 0) + int(low_item.sum())
        keep &= ~(low_user | low_item)


def _stats(total: int, dropped: dict, lengths: np.ndarray, num_items: int) -> dict:
    users, n = len(lengths), int(lengths.sum())
    pct = np.percentile(lengths, [5, 25, 50, 75, 95, 99]) if users else np.zeros(6)
    return {
        "rows_read": total,
        "users": users,
        "items": num_items,
        "interactions": n,
        "density": n / max(users * num_items, 1),
        "sequence_length": {"min": int(lengths.min()), "mean": float(lengths.mean()),
                            "max": int(lengths.max()),
                            **{f"p{p}": float(v) for p, v in zip((5, 25, 50, 75, 95, 99), pct)}},
        "split": {"train": n - 2 * users, "valid": users, "test": users},
        "dropped": {k: v for k, v in dropped.items() if v},
    }


def write(result: dict, out: Path, num_shards: int | None) -> None:
    """Write sequences in user-range shards plus vocabularies and stats."""
    lengths, items = result["lengths"], result["items"]
    users = len(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    owner = np.repeat(np.arange(users), lengths)
    is_train = np.arange(len(items)) < (offsets[1:] - 2)[owner]  # all but each user's last two
    shards = min(num_shards or -(-users // USERS_PER_SHARD), users)  # never an empty shard
    seq_dir = out / "sequences"
    seq_dir.mkdir(parents=True, exist_ok=True)
    for old in seq_dir.glob("part-*.parquet"):
        old.unlink()
    bounds = np.linspace(0, users, shards + 1).astype(np.int64)
    for s in range(shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        rows = slice(offsets[lo], offsets[hi])
        ends = offsets[lo + 1:hi + 1]
        train_offsets = np.concatenate([[0], np.cumsum(lengths[lo:hi] - 2)]).astype(np.int32)
        table = pa.table({
            "user": pa.array(np.arange(lo, hi, dtype=np.int32)),
            "train": pa.ListArray.from_arrays(pa.array(train_offsets),
                                              pa.array(items[rows][is_train[rows]], pa.int32())),
            "valid": pa.array(items[ends - 2], pa.int32()),
            "test": pa.array(items[ends - 1], pa.int32()),
        })
        pq.write_table(table, seq_dir / f"part-{s:05d}.parquet")
    # popularity from training positions only, so the most-popular baseline never sees test items
    counts = np.bincount(items[is_train], minlength=len(result["item_raw"]) + 1)[1:]
    pq.write_table(pa.table({"index": pa.array(np.arange(users, dtype=np.int32)),
                             "raw_id": result["user_raw"]}), out / rundir.USERS)
    pq.write_table(pa.table({"index": pa.array(np.arange(1, len(counts) + 1, dtype=np.int32)),
                             "raw_id": result["item_raw"], "count": pa.array(counts)}),
                   out / rundir.ITEMS)
    (out / "stats.json").write_text(json.dumps(result["stats"], indent=2))
