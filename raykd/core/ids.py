"""Raw ids: one rule for reading logs (prepare) and for answering requests (serve).

The rule, everywhere:

1. Text ids lose surrounding ASCII whitespace (space, tab, CR, LF, VT, FF): `" 7 "` is `"7"`.
   An id that is empty after that is missing. Prepare counts the ids it stripped (stats.json
   `normalised_ids`). NaN in a float id column is missing too, never the text "nan".
2. A vocabulary (users, items: each decided on its own) holds integers when every id is an integer:
   integer columns, whole-float columns, or text columns in which every id is written in canonical
   decimal (ASCII digits, an optional '-', no '+', no leading zeros). Otherwise it holds text, and
   `"007"` and `"7"` stay two different ids.
3. A request id matches a vocabulary id when they are the same id under 1 and 2, looked up in the
   vocabulary of its own kind (a user id in the user vocabulary, an item id in the item vocabulary):
   - integer vocabulary: a JSON integer is itself; a JSON string is an integer only when it is
     canonical decimal within int64 (`"42"`, `"-3"`). `"007"`, `"+7"`, `"--5"`, `"²"`, full-width
     `"０１"` or `"1e3"` are simply unknown ids: never an error, never another id;
   - text vocabulary: a JSON integer is its decimal text (`7` is `"7"`); a string is itself.
4. Bounds: a string id has at most MAX_ID_CHARS characters and must be valid Unicode (no lone
   surrogates); an integer id fits in int64. Requests outside them get HTTP 422.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

MAX_ID_CHARS = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
WHITESPACE = " \t\n\r\x0b\x0c"  # the ASCII whitespace that Arrow's ascii_trim_whitespace removes too
_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]{0,18}")  # [0-9]: ASCII digits only, unlike str.isdigit


def problem(raw: int | str) -> str | None:
    """Why a request id breaks the bounds of rule 4, or None."""
    if isinstance(raw, int):
        return None if INT64_MIN <= raw <= INT64_MAX else "integer ids must fit in 64 bits"
    if len(raw) > MAX_ID_CHARS:
        return f"ids have at most {MAX_ID_CHARS} characters, got {len(raw)}"
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return "ids must be valid Unicode text (this one holds a lone surrogate)"
    return None


def parse_int(text: str) -> int | None:
    """The integer that `text` is in canonical decimal within int64 (after rule 1), else None."""
    text = text.strip(WHITESPACE)
    if not _CANONICAL_INT.fullmatch(text):
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


def lookup_key(raw: int | str, int_vocabulary: bool) -> int | str | None:
    """The vocabulary key of a (bounded) request id under rule 3; None: it cannot be in the vocabulary."""
    if isinstance(raw, int):
        return raw if int_vocabulary else str(raw)
    return parse_int(raw) if int_vocabulary else raw.strip(WHITESPACE)


def text_key(raw: object) -> str:
    """An id of any source as text, for matching across files (external teacher scores)."""
    return raw.strip(WHITESPACE) if isinstance(raw, str) else str(raw)


def strip_text(col: pa.ChunkedArray | pa.Array) -> tuple[pa.ChunkedArray | pa.Array, int]:
    """Rule 1 on an Arrow column: (stripped column with empty ids as nulls, number of ids changed)."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return col, 0
    stripped = pc.ascii_trim_whitespace(col)
    changed = int(pc.sum(pc.not_equal(stripped, col)).as_py() or 0)
    if not changed:
        return col, 0
    return pc.if_else(pc.equal(stripped, ""), pa.scalar(None, col.type), stripped), changed
