"""Reading interaction logs in every supported format into one normalised shape.

`plan_sources(cfg)` runs on the driver before any Ray work: it finds the files, detects the
MovieLens variant, checks that the configured columns exist (listing the ones found) and returns
one `Source` per file (or per synthetic chunk). `read_source(source)` runs inside Ray Data tasks
and yields Arrow tables with the columns

    user, item   raw ids: text formats (csv, MovieLens) give strings, whose type (integer or text)
                 the driver decides once over all rows (`unify_ids`), so that it can never depend
                 on how the file was cut into blocks; parquet/jsonl keep their own types
    time         float64 sort key: numbers as given (epoch units), typed dates as epoch microseconds
                 (only when there is a time column: without one, file order is time order); the
                 driver checks that a column's epoch numbers share one unit (`epoch_units`)
    time_kind    int8 TIME_NUMBER or TIME_DATE per row; a column mixing both is an error
    time_text    date text, parsed by the driver with one format for the whole column (raykd.data.dates)
    order        int64 global file order: file index << 40 | row number, the tie-breaker
    flag         int8 row status (FLAG_* below); the driver counts them and raises on errors
    error        string, only on the one-row table of a source that could not be read

Rows are never dropped here, only flagged, so every dropped row is counted in one place. Errors
travel as data (the `error` column) rather than as exceptions, so that Ray never prints a task
traceback for what is a problem in the user's file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from raykd.config import DataConfig, SyntheticConfig
from raykd.core.errors import RaykdError
from raykd.data import synth

FLAG_OK, FLAG_LOW_RATING, FLAG_NULL_USER, FLAG_NULL_ITEM, FLAG_BAD_TIME, FLAG_BAD_RATING = range(6)
# flag -> (what is wrong, which configured column)
FLAG_NAMES = {
    FLAG_LOW_RATING: ("below_min_rating", "rating_col"),
    FLAG_NULL_USER: ("missing user id", "user_col"),
    FLAG_NULL_ITEM: ("missing item id", "item_col"),
    FLAG_BAD_TIME: ("missing or unparseable timestamp", "time_col"),
    FLAG_BAD_RATING: ("missing or unparseable rating", "rating_col"),
}
TIME_NUMBER, TIME_DATE = 0, 1
ROW_BITS = 40  # order = file_index << ROW_BITS | row: up to a trillion rows per file
BLOCK_BYTES = 16 << 20  # text read block size: bounds a task's memory, sets streaming granularity
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")  # Arrow decompresses these by their file name
TEXT_KINDS = ("csv",)  # formats whose ids arrive as text (MovieLens files are read as csv)

# MovieLens variants: file name -> (delimiter, header, column names as read, user, item, rating, time)
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
    time_format: str | None = None  # set: every time value is date text in this format
    chunk: tuple[int, int] | list[int] = (0, 0)  # synthetic: (first_user, num_users)
    synthetic: dict = field(default_factory=dict)
    block_bytes: int = BLOCK_BYTES  # csv/jsonl block size; parquet batches of block_bytes // 64 rows

    def where(self, row: int) -> str:
        """Human position of a 0-based data row: 'file line N' for text, 'file row N' otherwise."""
        if self.kind == "synthetic":
            return f"synthetic chunk {self.index} row {row + 1}"
        if self.kind == "csv":
            return f"{self.path} line {row + 1 + int(self.header)}"
        return f"{self.path} {'line' if self.kind == 'jsonl' else 'row'} {row + 1}"


def plan_sources(cfg: DataConfig, block_bytes: int = BLOCK_BYTES) -> list[Source]:
    """Resolve the configured input into readable sources, or raise a RaykdError saying why not."""
    cols = {"user_col": cfg.user_col, "item_col": cfg.item_col, "time_col": cfg.time_col,
            "rating_col": cfg.rating_col, "min_rating": cfg.min_rating, "block_bytes": block_bytes,
            "time_format": cfg.time_format}
    if cfg.format == "synthetic":
        syn = cfg.synthetic.model_dump()
        return [Source(i, "synthetic", user_col="user_id", item_col="item_id", time_col="timestamp",
                       chunk=c, synthetic=syn, block_bytes=block_bytes)
                for i, c in enumerate(synth.chunks(cfg.synthetic))]
    if not cfg.path:
        raise RaykdError(f"data.path is required for data.format={cfg.format!r}: set it to the log file or folder")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise RaykdError(f"data.path {path} does not exist (data.format={cfg.format!r}); check the path, "
                         "which is relative to the directory raykd runs in")
    if cfg.format == "movielens":
        return [_movielens_source(path, cfg.min_rating, block_bytes)]
    ext = {"csv": (".csv", ".tsv", ".txt", ".dat"), "parquet": (".parquet", ".pq"),
           "jsonl": (".jsonl", ".json", ".ndjson")}[cfg.format]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))
                       and _strip_compression(p.name.lower()).endswith(ext))
        if not files:
            raise RaykdError(f"data.path {path} is a folder with no {'/'.join(ext)} files for data.format="
                             f"{cfg.format!r}; point data.path at the log or set data.format to its format")
    else:
        files = [path]
    sources = []
    for i, f in enumerate(files):
        names = _columns_of(f, cfg.format, cfg.delimiter, cfg.header)
        wanted = [c for c in (cfg.user_col, cfg.item_col, cfg.time_col, cfg.rating_col) if c]
        missing = [c for c in wanted if c not in names]
        if missing:
            hint = ""
            if cfg.format == "csv" and len(names) == 1 and any(d in _first_line(f) for d in ",;\t|"):
                hint = f" (one column: is data.delimiter={cfg.delimiter!r} right?)"
            elif cfg.format == "csv" and not cfg.header:
                hint = " (data.header=false: columns are named by their 0-based index)"
            raise RaykdError(
                f"{f}: column(s) {', '.join(map(repr, missing))} not found; the file has columns "
                f"{', '.join(map(repr, names))}{hint}. Set data.user_col / data.item_col / "
                "data.time_col / data.rating_col to the names above.")
        sources.append(Source(i, cfg.format, str(f), cfg.delimiter, cfg.header,
                              tuple(names) if not cfg.header else (), **cols))
    return sources


HASH_CHUNK = 1 << 20  # bytes read per update of an input fingerprint


def fingerprint_files(paths: list[Path]) -> str:
    """Input files by resolved path, size and content (BLAKE2b streamed in 1 MiB chunks).

    Decides whether finished work built from them is reused: a file replaced by another of the same
    size and modification time, or a file of the same name in another folder, fingerprints anew.
    Reading every byte costs 1.2-1.8 s per GiB (page cache, one core); size and mtime alone
    (the old fingerprint) missed edits that keep both (copies with preserved times, os.utime).
    """
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        p = Path(p).resolve()
        try:
            with open(p, "rb") as f:
                h.update(f"{p}\0{os.fstat(f.fileno()).st_size}\0".encode())  # the size delimits the content
                while chunk := f.read(HASH_CHUNK):
                    h.update(chunk)
        except OSError as err:
            raise RaykdError(f"cannot read {p} to fingerprint it: {err.strerror or err}") from None
    return h.hexdigest()


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _movielens_source(path: Path, min_rating: float | None, block_bytes: int) -> Source:
    if path.is_dir():
        found = [path / n for n in MOVIELENS if (path / n).is_file()]
        if not found:
            raise RaykdError(f"{path} holds no MovieLens ratings file (looked for {', '.join(MOVIELENS)}); "
                             "point data.path at the ratings file or its folder")
        path = found[0]
    variant = path.name if path.name in MOVIELENS else _sniff_movielens(path)
    delim, header, names = MOVIELENS[variant]
    if header:
        found_names = _columns_of(path, "csv", delim, True)
        if found_names[:len(names)] != names:
            raise RaykdError(f"{path}: a MovieLens {variant} file starts with the header {','.join(names)}, "
                             f"this one has columns {', '.join(map(repr, found_names))}; for other logs use "
                             "data.format=csv with data.user_col / data.item_col / data.time_col")
    else:
        _columns_of(path, "csv", delim, False)  # empty-file check
    dat = variant == "ratings.dat"
    return Source(0, "csv", str(path), delim, header, () if header else tuple(names),
                  user_col=names[0], item_col=names[2] if dat else names[1], time_col=names[-1],
                  rating_col=names[-3] if dat else names[2], min_rating=min_rating, block_bytes=block_bytes)


def _sniff_movielens(path: Path) -> str:
    """The MovieLens variant of a renamed ratings file, from its first line."""
    first = _first_line(path)
    if "::" in first:
        return "ratings.dat"
    if first.replace(" ", "").lower().startswith("userid,movieid"):
        return "ratings.csv"
    if len(first.split("\t")) == 4:
        return "u.data"
    raise RaykdError(f"{path} does not look like a MovieLens ratings file (first line {first[:80]!r}; expected "
                     f"{', '.join(MOVIELENS)} content); for other logs use data.format=csv")


def _first_line(f: Path) -> str:
    try:
        with pa.input_stream(str(f), compression="detect") as fh:  # .gz, .bz2, .zst read as they are
            first = fh.read(1 << 20).split(b"\n", 1)[0]
    except (OSError, pa.ArrowException) as err:
        raise RaykdError(f"cannot read {f}: {getattr(err, 'strerror', None) or err}") from None
    if not first.strip():
        raise RaykdError(f"input file {f} is empty (its first line is blank); remove it or fill it")
    return first.decode("utf-8-sig", errors="replace").rstrip("\r\n")


def _columns_of(f: Path, fmt: str, delimiter: str, header: bool) -> list[str]:
    if fmt == "parquet":
        try:
            return list(pq.read_schema(f).names)
        except (pa.ArrowException, OSError) as err:
            raise RaykdError(f"cannot read {f} as parquet: {err}") from None
    first = _first_line(f)
    if fmt == "jsonl":
        try:
            row = json.loads(first)
        except ValueError as err:
            raise RaykdError(f"{f} is not JSON Lines (one JSON object per line): line 1: {err}") from None
        if not isinstance(row, dict):
            raise RaykdError(f"{f} is not JSON Lines: line 1 holds a {type(row).__name__}, not an object "
                             "(a JSON array file must be converted to one object per line)")
        return list(row)
    fields = next(csv.reader([first], delimiter=delimiter))
    return fields if header else [str(i) for i in range(len(fields))]


def read_source(src: Source) -> Iterator[pa.Table]:
    """Yield normalised tables (see module docstring) for one source, in file order.

    Never raises for a bad file: the problem arrives as a one-row table with an `error` column.
    """
    row = 0
    try:
        for raw in _raw_batches(src):
            yield normalise(raw, src, row)
            row += raw.num_rows
    except RaykdError as err:
        yield _error_table(src, str(err))
    except (pa.ArrowException, ValueError, OSError, UnicodeError, KeyError, TypeError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"after {src.where(row - 1)}" if row else "in the first block"
        yield _error_table(src, f"cannot read {src.path or 'synthetic chunk'} as {src.kind} ({where}): {text}. "
                                "Fix the file or check data.format / data.delimiter / data.header.")


def _error_table(src: Source, message: str) -> pa.Table:
    return pa.table({"order": pa.array([np.int64(src.index) << ROW_BITS]), "flag": pa.array([FLAG_OK], pa.int8()),
                     "error": [message]})


def _raw_batches(src: Source) -> Iterator[pa.Table]:
    wanted = [c for c in (src.user_col, src.item_col, src.time_col, src.rating_col) if c]
    if src.kind == "synthetic":
        yield synth.generate_chunk(SyntheticConfig(**src.synthetic), *src.chunk)
    elif src.kind == "parquet":
        rows = max(1, src.block_bytes // 64)
        for batch in pq.ParquetFile(src.path).iter_batches(batch_size=rows, columns=wanted):
            yield pa.Table.from_batches([batch])
    elif src.kind == "jsonl":
        table = pajson.read_json(src.path, pajson.ReadOptions(block_size=src.block_bytes))
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise RaykdError(f"{src.path}: column(s) {', '.join(map(repr, missing))} not found in any line; "
                             f"the file has columns {', '.join(map(repr, table.column_names))}")
        yield from (pa.Table.from_batches([b]) for b in table.select(wanted).to_batches())
    else:
        malformed: list = []

        def skip(row: pacsv.InvalidRow) -> str:  # count every malformed line, report them together
            malformed.append(row)
            return "skip"

        read = pacsv.ReadOptions(block_size=src.block_bytes, column_names=list(src.column_names) or None)
        parse = pacsv.ParseOptions(delimiter=src.delimiter, invalid_row_handler=skip)
        # ids and times as text: their types are decided over all rows, never guessed per block
        convert = pacsv.ConvertOptions(include_columns=wanted, strings_can_be_null=True,
                                       null_values=[""], column_types={c: pa.string() for c in wanted})
        with pacsv.open_csv(src.path, read, parse, convert) as reader:
            for batch in reader:
                if not malformed:
                    yield pa.Table.from_batches([batch])
        if malformed:
            first = malformed[0]
            examples = ", ".join(repr(r.text[:80]) for r in malformed[:3])
            raise RaykdError(
                f"{src.path}: {len(malformed):,} malformed line(s) with the wrong number of fields (expected "
                f"{first.expected_columns} separated by {src.delimiter!r}, e.g. found {first.actual_columns}): "
                f"{examples}. Fix or remove these lines, or check data.delimiter / data.header.")


def normalise(raw: pa.Table, src: Source, first_row: int) -> pa.Table:
    """Map one raw chunk to (user, item, [time, time_kind], order, flag); flags mark rows to count or reject."""
    n = raw.num_rows
    order = (np.int64(src.index) << ROW_BITS) + first_row + np.arange(n, dtype=np.int64)
    text = src.kind in TEXT_KINDS
    user = _ids(raw.column(src.user_col), text, src, "data.user_col")
    item = _ids(raw.column(src.item_col), text, src, "data.item_col")
    flag = np.zeros(n, dtype=np.int8)
    columns = {"user": user, "item": item}
    if src.time_col:
        time, kind, bad_time, text = _times(raw.column(src.time_col), src)
        flag[bad_time] = FLAG_BAD_TIME
        columns.update(time=time, time_kind=kind, time_text=text)
    if src.rating_col and src.min_rating is not None:
        rating = _numbers(raw.column(src.rating_col))
        flag[np.isnan(rating)] = FLAG_BAD_RATING
        flag[(flag == FLAG_OK) & (rating < src.min_rating)] = FLAG_LOW_RATING
    flag[pc.is_null(item).to_numpy(zero_copy_only=False)] = FLAG_NULL_ITEM
    flag[pc.is_null(user).to_numpy(zero_copy_only=False)] = FLAG_NULL_USER
    return pa.table({**columns, "order": order, "flag": flag})


def _array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.dictionary_decode() if pa.types.is_dictionary(col.type) else col


def _ids(col: pa.ChunkedArray, text: bool, src: Source, setting: str) -> pa.Array:
    """Text formats: the text as is. Typed formats: int64 for integers (and whole floats), else text.

    NaN in a float column is a missing id (a null), never the text 'nan' (raykd.core.ids, rule 1).
    """
    col = _array(col)
    t = col.type
    if pa.types.is_integer(t):
        return col.cast(pa.int64())
    if pa.types.is_floating(t):
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, t), col)
        whole = pc.all(pc.equal(pc.floor(col), col)).as_py()
        return col.cast(pa.int64()) if whole in (True, None) else col.cast(pa.string())
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t):  # null: an empty column
        return col.cast(pa.string())
    if text:
        return col.cast(pa.string())
    raise RaykdError(f"{src.path}: the id column {setting} holds {t} values; ids must be integers or text")


def unify_ids(col: pa.ChunkedArray, text: bool) -> pa.ChunkedArray:
    """Decide an id column's type once over all rows: int64 if every text id is a plain integer.

    '007' or '+7' keep the ids text, since they would not read back as the same raw id (raykd.core.ids,
    rule 2; surrounding whitespace is stripped before this).
    """
    if not text or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return col
    try:
        ints = pc.cast(col, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return col
    same = pc.equal(pc.cast(ints, pa.string()), col)
    return ints if pc.all(pc.fill_null(same, True)).as_py() is not False else col


def _numbers(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """float64 values, NaN where missing or not a number (safe=False: int64 beyond 2**53, e.g. epoch ns,
    rounds to the nearest float instead of failing)."""
    col = _array(col)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type):
        values = pc.fill_null(pc.cast(col, pa.float64(), safe=False), np.nan).to_numpy(zero_copy_only=False)
    else:
        try:  # fast path: every value is number text
            values = pc.fill_null(pc.cast(col.cast(pa.string()), pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = pd.to_numeric(pd.Series(col.to_pylist(), dtype=object), errors="coerce").to_numpy(
                dtype=np.float64)
    values = np.array(values, dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    return values


# Dates become float64 microseconds since 1970 (exact for any real date): every path below turns
# the same instant into the same float, so a row's key never depends on how its block was parsed.
_UNIT_MICROS = {"s": 1e6, "ms": 1e3, "us": 1.0, "ns": 1e-3}


# Epoch units by magnitude: a number n with |n| >= 1e8 is read in the unit that puts it between
# March 1973 and the year 5138 (1e8 <= |n| / per-second < 1e11); smaller numbers (earlier seconds,
# event counters) have no unit of their own.
EPOCH_UNITS = ("seconds", "milliseconds", "microseconds", "nanoseconds")


def epoch_units(values: np.ndarray) -> np.ndarray:
    """Per value, the index in EPOCH_UNITS its magnitude implies, or -1 (|n| < 1e8: no unit).

    Seconds and milliseconds of the same day differ a thousandfold, so a column holding both sorts
    every millisecond row after every second row: the driver refuses such a column."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    unit = np.searchsorted([1e8, 1e11, 1e14, 1e17], magnitude, side="right") - 1
    return np.where(np.isfinite(magnitude), unit, -1)


def _times(col: pa.ChunkedArray, src: Source) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Array]:
    """Sort keys, kinds (number or date), a missing-value mask, and date text for the driver: one block
    cannot tell whether 12/01/2020 is day-first, so the driver reads the whole column with one format
    (raykd.data.dates). Numbers (epoch, any unit) stay as given; typed dates become microseconds."""
    col = _array(col)
    n, t = len(col), col.type
    kind = np.full(n, TIME_NUMBER, dtype=np.int8)
    no_text = pa.nulls(n, pa.string())
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        if pa.types.is_timestamp(t):
            scale = _UNIT_MICROS[t.unit]
        else:
            scale = 86400e6 if pa.types.is_date32(t) else 1e3
        raw = col.cast(pa.int32() if pa.types.is_date32(t) else pa.int64())
        micros = pc.fill_null(pc.cast(raw, pa.float64(), safe=False), np.nan).to_numpy(zero_copy_only=False) * scale
        kind[:] = TIME_DATE
        bad = np.isnan(micros)
        return np.where(bad, 0.0, micros), kind, bad, no_text
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise RaykdError(f"{src.path}: the time column data.time_col={src.time_col!r} holds {t} values; "
                         "expected numbers (epoch time), dates or date text")
    missing = pc.is_null(col).to_numpy(zero_copy_only=False)
    values = np.full(n, np.nan) if src.time_format else _numbers(col)
    rest = np.isnan(values) & ~missing  # text that is not a number: dates, read by the driver
    text = pc.if_else(pa.array(rest), col.cast(pa.string()), pa.scalar(None, pa.string())) if rest.any() else no_text
    kind[rest] = TIME_DATE
    bad = np.isnan(values) & ~rest
    return np.where(np.isnan(values), 0.0, values), kind, bad, text
