"""Date text -> sort keys (float64 microseconds since 1970, UTC), with one format per column.

A column's dates are read with one format, chosen once over all its distinct values, never per
value (a per-value guess reads 12/01/2020 as 1 December and 13/01/2020 as 13 January):

- `data.time_format` when set: a strptime format ('%d/%m/%Y %H:%M') or 'ISO8601';
- else ISO 8601 when it reads every value (ISO dates are year-month-day, never ambiguous; zone
  offsets are honoured and naive times are UTC);
- else the formats pandas guesses from the values, month-first and day-first: the one that reads
  the most values is used. When two formats read as many values but disagree on one (is 12/01/2020
  the 12th of January or the 1st of December?) the column is ambiguous: a RaykdError names a value
  and its two readings and asks for `data.time_format`.

Values the chosen format cannot read come back as NaN: prepare reports them as unparseable
timestamps, with their rows.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from raykd.core.errors import RaykdError

GUESS_SAMPLE = 2000  # distinct values whose formats are guessed (every value is then parsed)
# day/month orders pandas does not guess (two-digit years), tried on the sample too
COMMON = [f"{a}{sep}{b}{sep}{y}{t}" for sep in "/-." for a, b in (("%d", "%m"), ("%m", "%d")) for y in ("%Y", "%y")
          for t in ("", " %H:%M", " %H:%M:%S")]


def parse(text: pa.Array, time_format: str | None, column: str) -> np.ndarray:
    """Microseconds per value of a string array (NaN where the column's format cannot read it)."""
    uniq = pc.unique(text).drop_null()
    codes = pc.index_in(text, value_set=uniq)
    if len(uniq) == 0:
        return np.full(len(text), np.nan)
    if time_format:
        micros = _with_format(uniq, time_format)
    else:
        micros = _infer(uniq, column)
    out = np.full(len(text), np.nan)
    valid = pc.is_valid(codes).to_numpy(zero_copy_only=False)
    out[valid] = micros[codes.drop_null().to_numpy(zero_copy_only=False)]
    return out


def _with_format(uniq: pa.Array, fmt: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas warns about formats it cannot vectorise
        parsed = pd.to_datetime(pd.Series(uniq.to_pylist(), dtype=object), format=fmt, errors="coerce", utc=True)
    return ((parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(1, "us")).to_numpy(dtype=np.float64)


def _infer(uniq: pa.Array, column: str) -> np.ndarray:
    try:  # fast path: ISO 8601 without zone offsets, which Arrow reads (as UTC)
        return uniq.cast(pa.timestamp("us")).cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    step = max(1, len(uniq) // GUESS_SAMPLE)
    sample = uniq.take(pa.array(np.arange(0, len(uniq), step)[:GUESS_SAMPLE]))
    candidates = ["ISO8601", *_guesses(sample)]
    # formats that read the most sampled values are then tried on every value
    on_sample = {fmt: int(np.isfinite(_with_format(sample, fmt)).sum()) for fmt in candidates}
    results = {fmt: _with_format(uniq, fmt) for fmt in candidates if on_sample[fmt] == max(on_sample.values())}
    if np.isfinite(results.get("ISO8601", [np.nan])).all():  # ISO 8601 is year-month-day: never ambiguous
        return results["ISO8601"]
    counts = {fmt: int(np.isfinite(m).sum()) for fmt, m in results.items()}
    top = [fmt for fmt, c in counts.items() if c == max(counts.values())]
    chosen = results[top[0]]
    for fmt in top[1:]:
        other = results[fmt]
        differ = ~((chosen == other) | (np.isnan(chosen) & np.isnan(other)))
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            value = uniq[i].as_py()
            readings = [_show(results[f][i]) for f in (top[0], fmt)]
            raise RaykdError(
                f"the time column {column!r} is ambiguous: its dates read equally well as {top[0]!r} and {fmt!r}, "
                f"which disagree (e.g. {value!r} is {readings[0]} or {readings[1]}). Set data.time_format to "
                f"the format the column is written in, e.g. data.time_format='{fmt}'")
    return chosen


def _guesses(sample: pa.Array) -> list[str]:
    """Formats pandas guesses for the sampled values (most common first), then common ones that read any."""
    seen: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas warns when dayfirst does not fit a value: expected here
        for value in sample.to_pylist():
            for dayfirst in (False, True):
                try:
                    fmt = pd.tseries.api.guess_datetime_format(value, dayfirst=dayfirst)
                except (ValueError, TypeError, OverflowError):
                    fmt = None
                if fmt and not re.match(r"%Y\W?%d", fmt):  # year-day-month: nobody writes it
                    seen[fmt] = seen.get(fmt, 0) + 1
    guesses = sorted(seen, key=lambda f: -seen[f])[:8]
    return guesses + [f for f in COMMON if f not in seen and np.isfinite(_with_format(sample, f)).any()]


def _show(micros: float) -> str:
    if not np.isfinite(micros):
        return "unreadable"
    return pd.Timestamp(int(micros), unit="us", tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC")
