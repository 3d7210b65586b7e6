"""Reading interaction logs in every supported format into one normalised shape.

`plan_sources(cfg)` runs on the driver before any Ray work: it finds the files, detects the
MovieLens variant, checks that the configured columns exist (listing the ones found) and returns
one `Source` per file (or per synthetic chunk). `read_source(source)` runs inside Ray Data tasks
and yields Arrow tables with the columns

    user, item   raw ids: int64 when every id in the chunk is a plain integer, else string
    time         int64 sort key (epoch units as given; file order when there is no time column)
    order        int64 global file order: file index << 40 | row number, the tie-breaker
    flag         int8 row status (FLAG_* below); the driver counts them and raises on errors

Rows are never dropped here, only flagged, so every dropped row is counted in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from raykd.config import DataConfig
from raykd.errors import RaykdError
from raykd import synth

FLAG_OK, FLAG_LOW_RATING, FLAG_NULL_USER, FLAG_NULL_ITEM, FLAG_BAD_TIME, FLAG_BAD_RATING = range(6)
FLAG_NAMES = {
    FLAG_LOW_RATING: "below_min_rating",
    FLAG_NULL_USER: "missing user id",
    FLAG_NULL_ITEM: "missing item id",
    FLAG_BAD_TIME: "missing or unparseable timestamp",
    FLAG_BAD_RATING: "missing or unparseable rating",
}
ROW_BITS = 40  # order = file_index << ROW_BITS | row: up to a trillion rows per file
BLOCK_BYTES = 16 << 20  # text read block size: bounds a task's memory, sets streaming granularity

# MovieLens variants: file name -> (delimiter, header, column names as read)
MOVIELENS = {
    "u.data": ("\t", False, ["user", "item", "rating", "time"]),
    # '::' is split on ':' and the empty fields between the colons are skipped
    "ratings.dat": (":", False, ["user", "_a", "item", "_b", "rating", "_c", "time"]),
    "ratings.csv": (",", True, ["userId", "movieId", "rating", "timestamp"]),
}


@dataclass(frozen=True)
class Source:
    """One unit of reading work: a file (or a synthetic chunk) and how to read it."""

    index: int  # file order
    kind: str  # csv | parquet | jsonl | synthetic
    path: str = ""
    delimiter: str = ","
    header: bool = True
    column_names: tuple[str, ...] | list[str] = ()  # csv without header
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str | None = None
    rating_col: str | None = None
    min_rating: float | None = None
    chunk: tuple[int, int] | list[int] = (0, 0)  # synthetic: (first_user, num_users)
    synthetic: dict = field(default_factory=dict)


def plan_sources(cfg: DataConfig) -> list[Source]:
    """Resolve the configured input into readable sources, or raise a RaykdError saying why not."""
    cols = dict(user_col=cfg.user_col, item_col=cfg.item_col, time_col=cfg.time_col,
                rating_col=cfg.rating_col, min_rating=cfg.min_rating)
    if cfg.format == "synthetic":
        syn = cfg.synthetic.model_dump()
        return [Source(i, "synthetic", user_col="user_id", item_col="item_id", time_col="timestamp",
                       chunk=c, synthetic=syn) for i, c in enumerate(synth.chunks(cfg.synthetic))]
    if not cfg.path:
        raise RaykdError(f"data.path is required for data.format={cfg.format!r}")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise RaykdError(f"data.path {path} does not exist")
    if cfg.format == "movielens":
        return [_movielens_source(path, cfg.min_rating)]
    ext = {"csv": (".csv", ".tsv", ".txt", ".dat"), "parquet": (".parquet", ".pq"),
           "jsonl": (".jsonl", ".json", ".ndjson")}[cfg.format]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in ext) if path.is_dir() else [path]
    if not files:
        raise RaykdError(f"data.path {path} is a folder with no {'/'.join(ext)} files")
    sources = []
    for i, f in enumerate(files):
        if f.stat().st_size == 0:
            raise RaykdError(f"input file {f} is empty")
        names = _columns_of(f, cfg.format, cfg.delimiter, cfg.header)
        wanted = [c for c in (cfg.user_col, cfg.item_col, cfg.time_col, cfg.rating_col) if c]
        missing = [c for c in wanted if c not in names]
        if missing:
            hint = "" if cfg.header or cfg.format != "csv" else " (no header: name columns by 0-based index)"
            raise RaykdError(
                f"{f}: column(s) {', '.join(map(repr, missing))} not found; the file has columns "
                f"{', '.join(map(repr, names))}{hint}. Set data.user_col / data.item_col / "
                "data.time_col / data.rating_col to the names above."
            )
        sources.append(Source(i, cfg.format, str(f), cfg.delimiter, cfg.header,
                              tuple(names) if not cfg.header else (), **cols))
    return sources


def _movielens_source(path: Path, min_rating: float | None) -> Source:
    if path.is_dir():
        found = [path / n for n in MOVIELENS if (path / n).is_file()]
        if not found:
            raise RaykdError(f"{path} holds no MovieLens ratings file (looked for {', '.join(MOVIELENS)})")
        path = found[0]
    if path.name not in MOVIELENS:
        raise RaykdError(f"{path} is not a MovieLens ratings file (expected one of {', '.join(MOVIELENS)})")
    if path.stat().st_size == 0:
        raise RaykdError(f"input file {path} is empty")
    delim, header, names = MOVIELENS[path.name]
    return Source(0, "csv", str(path), delim, header, () if header else tuple(names),
                  user_col=names[0], item_col=names[2] if path.name == "ratings.dat" else names[1],
                  time_col=names[-1], rating_col=names[-3] if path.name == "ratings.dat" else names[2],
                  min_rating=min_rating)


def _columns_of(f: Path, fmt: str, delimiter: str, header: bool) -> list[str]:
    try:
        if fmt == "parquet":
            return list(pq.read_schema(f).names)
        with open(f, "rb") as fh:
            first = fh.readline().decode("utf-8", errors="replace").rstrip("\r\n")
        if fmt == "jsonl":
            return list(json.loads(first).keys()) if first.strip() else []
        fields = first.split(delimiter)
        return fields if header else [str(i) for i in range(len(fields))]
    except Exception as err:  # noqa: BLE001 - any parse failure is a user-facing input problem
        raise RaykdError(f"cannot read {f} as {fmt}: {err}") from None


def read_source(src: Source) -> Iterator[pa.Table]:
    """Yield normalised tables (see module docstring) for one source, in file order."""
    row = 0
    for raw in _raw_batches(src):
        yield normalise(raw, src, row)
        row += raw.num_rows


def _raw_batches(src: Source) -> Iterator[pa.Table]:
    wanted = [c for c in (src.user_col, src.item_col, src.time_col, src.rating_col) if c]
    try:
        if src.kind == "synthetic":
            from raykd.config import SyntheticConfig

            yield synth.generate_chunk(SyntheticConfig(**src.synthetic), *src.chunk)
        elif src.kind == "parquet":
            for batch in pq.ParquetFile(src.path).iter_batches(batch_size=1 << 20, columns=wanted):
                yield pa.Table.from_batches([batch])
        elif src.kind == "jsonl":
            yield pajson.read_json(src.path).select(wanted)
        else:
            read = pacsv.ReadOptions(block_size=BLOCK_BYTES, column_names=list(src.column_names) or None)
            parse = pacsv.ParseOptions(delimiter=src.delimiter)
            # ids and times as text: types are decided per chunk in normalise(), never guessed wrong
            convert = pacsv.ConvertOptions(include_columns=wanted, strings_can_be_null=True,
                                           null_values=[""], column_types={c: pa.string() for c in wanted})
            with pacsv.open_csv(src.path, read, parse, convert) as reader:
                for batch in reader:
                    yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, ValueError, OSError) as err:
        raise RaykdError(f"cannot read {src.path} as {src.kind}: {err}") from None


def normalise(raw: pa.Table, src: Source, first_row: int) -> pa.Table:
    """Map one raw chunk to (user, item, time, order, flag); flags mark rows to count or reject."""
    n = raw.num_rows
    order = (np.int64(src.index) << ROW_BITS) + first_row + np.arange(n, dtype=np.int64)
    user, item = _ids(raw.column(src.user_col)), _ids(raw.column(src.item_col))
    flag = np.zeros(n, dtype=np.int8)
    if src.time_col:
        time, bad_time = _times(raw.column(src.time_col))
        flag[bad_time] = FLAG_BAD_TIME
    else:
        time = order
    if src.rating_col and src.min_rating is not None:
        rating = _numbers(raw.column(src.rating_col))
        flag[np.isnan(rating)] = FLAG_BAD_RATING
        flag[(flag == FLAG_OK) & (rating < src.min_rating)] = FLAG_LOW_RATING
    flag[pc.is_null(item).to_numpy(zero_copy_only=False)] = FLAG_NULL_ITEM
    flag[pc.is_null(user).to_numpy(zero_copy_only=False)] = FLAG_NULL_USER
    return pa.table({"user": user, "item": item, "time": time, "order": order, "flag": flag})


def _ids(col: pa.ChunkedArray) -> pa.Array:
    """int64 when every value is a plain integer (text '007' stays text), else string."""
    col = col.combine_chunks()
    if pa.types.is_integer(col.type):
        return col.cast(pa.int64())
    text = col.cast(pa.string())
    try:
        ints = pc.cast(text, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return text
    same = pc.equal(pc.cast(ints, pa.string()), text)
    return ints if pc.all(pc.fill_null(same, True)).as_py() else text


def _numbers(col: pa.ChunkedArray) -> np.ndarray:
    col = col.combine_chunks()
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return pc.fill_null(col.cast(pa.float64()), np.nan).to_numpy()
    return pd.to_numeric(pd.Series(col.to_pandas()), errors="coerce").to_numpy(dtype=np.float64)


def _times(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Sort keys from integer, float, numeric-text or date-text timestamps, and a bad-row mask."""
    col = col.combine_chunks()
    if pa.types.is_integer(col.type):
        bad = pc.is_null(col).to_numpy(zero_copy_only=False)
        return pc.fill_null(col.cast(pa.int64()), 0).to_numpy(), bad
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        as_int = col.cast(pa.timestamp("ns")).cast(pa.int64())
        return pc.fill_null(as_int, 0).to_numpy(), pc.is_null(col).to_numpy(zero_copy_only=False)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:  # fast path: integer text
            ints = pc.cast(col, pa.int64())
            return pc.fill_null(ints, 0).to_numpy(), pc.is_null(ints).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    numbers = _numbers(col)
    if np.mean(~np.isnan(numbers)) >= 0.5:  # mostly numeric: epoch values, keep ms precision
        bad = np.isnan(numbers)
        return np.where(bad, 0, np.round(numbers * 1000)).astype(np.int64), bad
    dates = pd.to_datetime(pd.Series(col.to_pandas()), errors="coerce", utc=True, format="mixed")
    bad = dates.isna().to_numpy()
    return np.where(bad, 0, dates.to_numpy().astype("datetime64[ns]").astype(np.int64)), bad
