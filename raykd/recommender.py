"""A servable student: model + vocabulary + known user histories, and request validation.

Plain Python (no Ray): the Ray Serve deployment (raykd.serve) and any other server or batch
job use the same `Recommender` so answers never depend on how they are served.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from raykd import ids, models, sequences
from raykd.errors import RaykdError


def _valid_text(raw: str) -> str:
    if problem := ids.problem(raw):
        raise ValueError(problem)
    return raw


def _whole(value: Any) -> Any:
    # JSON Schema counts 7.0 as an integer, so the API does too (never True, never "7" for k)
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[StrictInt, BeforeValidator(_whole)]
# raykd.ids rule 4: 64-bit integers, or bounded valid Unicode text
RawId = (Annotated[StrictInt, Field(ge=ids.INT64_MIN, le=ids.INT64_MAX), BeforeValidator(_whole)]
         | Annotated[StrictStr, Field(max_length=ids.MAX_ID_CHARS), AfterValidator(_valid_text)])


class RecommendRequest(BaseModel):
    """Body of POST /recommend: a history of raw item ids (oldest first) or a known user id.

    Ids follow raykd.ids: user ids are matched in the user vocabulary, item ids in the item
    vocabulary, each by its own type; an id that cannot be in the vocabulary is simply unknown.
    """

    model_config = ConfigDict(extra="forbid")
    history: list[RawId] | None = Field(None, description="raw item ids, oldest first (at most serve.max_history)")
    user_id: RawId | None = Field(None, description="a user of the prepared data: its whole known history is used")
    k: Integer = Field(10, ge=1, description="how many items (at most serve.max_k)")
    exclude_seen: StrictBool = Field(True, description="never recommend an item of the history")

    @model_validator(mode="after")
    def _one_source(self) -> RecommendRequest:
        given = [f for f in ("history", "user_id") if f in self.model_fields_set]
        if len(given) != 1 or getattr(self, given[0]) is None:  # an explicit null is not a source either
            raise ValueError("give exactly one of 'history' (a list of item ids) or 'user_id'")
        return self


def request_schema(max_k: int = 1000, max_history: int = 1000) -> dict:
    """JSON schema of the body with a deployment's limits: exactly what `Recommender.parse` accepts."""
    schema = RecommendRequest.model_json_schema()
    props = schema["properties"]
    for name in ("history", "user_id"):  # null only stands for "not given" in the model
        props[name].pop("default", None)
        props[name]["anyOf"] = [s for s in props[name]["anyOf"] if s.get("type") != "null"]
    props["history"]["anyOf"][0]["maxItems"] = max_history
    props["k"]["maximum"] = max_k
    schema["oneOf"] = [{"required": ["history"]}, {"required": ["user_id"]}]
    return schema


class RecommendResponse(BaseModel):
    """Answer of POST /recommend: raw item ids best first, their scores, and the ids not in the catalogue."""

    items: list[StrictInt | StrictStr]
    scores: list[float]
    model: str
    unknown_items: list[StrictInt | StrictStr]
    fallback: str | None = Field(None, description="'popularity' when no history item is known")


class BadRequest(Exception):
    """A request the client must fix: carries the HTTP status and a message saying what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def resolve_student(path: str | Path) -> Path:
    """A run directory serves its tuned winner if present, else its student; or a model folder."""
    path = Path(path)
    for candidate in (path / "tune" / "best", path / "student", path):
        if (candidate / "model.json").exists():
            return candidate
    raise RaykdError(f"{path} holds no servable model (looked for tune/best/, student/ and model.json)")


class Recommender:
    """Loads a student once; answers batches of validated requests."""

    def __init__(self, path: str | Path, max_k: int = 100, max_history: int = 1000):
        self.model_dir = resolve_student(path)
        self.model, self.desc = models.load_model(self.model_dir)
        self.max_k, self.max_history = max_k, max_history
        data_dir = _find_data_dir(self.model_dir)
        items = pq.read_table(data_dir / "items.parquet")
        self.int_items = pa.types.is_integer(items.schema.field("raw_id").type)
        users = data_dir / "users.parquet"
        self.int_users = users.exists() and pa.types.is_integer(pq.read_schema(users).field("raw_id").type)
        self.raw_items = [None, *items["raw_id"].to_pylist()]
        self.index = {raw: i for i, raw in enumerate(self.raw_items) if i}
        counts = items["count"].to_numpy()
        self.popular = np.argsort(-counts, kind="stable") + 1
        self.popular_scores = counts[self.popular - 1].astype(float)
        self.histories = _user_histories(data_dir)
        tag = hashlib.sha256(str(self.desc.get("fingerprint")).encode()).hexdigest()[:8]
        self.model_id = f"{self.model_dir.name}-{self.desc['family']}{self.desc['dim']}x{self.desc['layers']}-{tag}"

    def parse(self, body: dict[str, Any]) -> tuple[np.ndarray, list, int, bool]:
        """Validate a request body -> (item indices, unknown raw ids, k, exclude_seen)."""
        try:
            req = RecommendRequest.model_validate(body)
        except ValidationError as err:
            raise BadRequest(422, _explain(err)) from None
        if not 1 <= req.k <= self.max_k:
            raise BadRequest(422, f"k must be between 1 and {self.max_k}, got {req.k}")
        if req.user_id is not None:
            key = ids.lookup_key(req.user_id, self.int_users)
            if key is None or key not in self.histories:
                raise BadRequest(404, f"unknown user_id {req.user_id!r}: send its 'history' instead")
            return self.histories[key], [], req.k, req.exclude_seen
        if len(req.history) > self.max_history:
            raise BadRequest(422, f"history has {len(req.history)} items; at most {self.max_history} are "
                                  "accepted (send the most recent ones)")
        known, unknown = [], []
        for raw in req.history:
            idx = self.index.get(ids.lookup_key(raw, self.int_items))
            (known.append(idx) if idx else unknown.append(raw))
        return np.asarray(known, dtype=np.int64), unknown, req.k, req.exclude_seen

    @torch.no_grad()
    def recommend_many(self, requests: list[tuple[np.ndarray, list, int, bool]]) -> list[dict]:
        """Score a batch of parsed requests in one forward pass; popularity for empty histories."""
        out: list[dict | None] = [None] * len(requests)
        rows = [i for i, (hist, *_rest) in enumerate(requests) if len(hist)]
        if rows:
            padded = models.left_pad([requests[i][0] for i in rows], self.desc["max_len"])
            scores = self.model.last_scores(padded).float()
            scores[:, 0] = -torch.inf
            for r, i in enumerate(rows):
                hist, unknown, k, exclude = requests[i]
                s = scores[r]
                if exclude:
                    s[torch.as_tensor(hist)] = -torch.inf
                top = torch.topk(s, min(k, int(torch.isfinite(s).sum())))
                out[i] = self._answer(top.indices.numpy(), top.values.numpy(), unknown, None)
        for i, (hist, unknown, k, _) in enumerate(requests):
            if out[i] is None:
                out[i] = self._answer(self.popular[:k], self.popular_scores[:k], unknown, "popularity")
        return out

    def _answer(self, idx: np.ndarray, scores: np.ndarray, unknown: list, fallback: str | None) -> dict:
        answer = {"items": [self.raw_items[i] for i in idx.tolist()], "scores": [round(float(s), 5) for s in scores],
                  "model": self.model_id, "unknown_items": unknown}
        if fallback:
            answer["fallback"] = fallback
        return answer

    def describe(self) -> dict:
        metrics = {}
        if (self.model_dir / "metrics.json").exists():
            m = json.loads((self.model_dir / "metrics.json").read_text())
            metrics = {"valid": m.get("valid"), "best_epoch": m.get("best_epoch")}
        return {"model": self.model_id, "path": str(self.model_dir), "description": self.desc,
                "params": models.count_params(self.model), "items": len(self.raw_items) - 1,
                "users_with_history": len(self.histories), "metrics": metrics,
                "limits": {"max_k": self.max_k, "max_history": self.max_history}}


def _find_data_dir(model_dir: Path) -> Path:
    # a model folder: teacher/, tune/best/, or kd_curve/d<width>/student/ three levels down
    for candidate in (model_dir, *(model_dir.parents[i] / "data" for i in range(min(3, len(model_dir.parents))))):
        if (candidate / "items.parquet").exists():
            return candidate
    raise RaykdError(f"no item vocabulary (items.parquet) next to {model_dir} or in its run's data/")


def _user_histories(data_dir: Path) -> dict:
    """Raw user id -> full known history (train + valid + test) as item indices, if prepared."""
    if not (data_dir / "users.parquet").exists() or not (data_dir / "sequences").exists():
        return {}
    split = sequences.read_split(data_dir)
    raw_users = pq.read_table(data_dir / "users.parquet")["raw_id"].to_pylist()
    return {raw_users[u]: np.concatenate([t, [v, s]]).astype(np.int64)
            for u, t, v, s in zip(split["user"], split["train"], split["valid"], split["test"])}


def _explain(err: ValidationError) -> str:
    """One line per bad field; an id that is neither kind gets the id rule rather than two union errors."""
    problems: dict[str, str] = {}
    for e in err.errors():
        loc = e["loc"]
        if loc and loc[0] in ("history", "user_id"):  # drop pydantic's union member tags
            loc = loc[:2] if loc[0] == "history" and len(loc) > 2 else loc[:1]
        where = ".".join(str(p) for p in loc)[:100] or "body"  # loc may hold a client's (long) key
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("int_type", "string_type") and where != "k":
            msg = f"ids are 64-bit integers or text of at most {ids.MAX_ID_CHARS} characters"
        if where not in problems or e["type"] not in ("int_type", "string_type"):
            problems[where] = msg
    return "; ".join(f"{where}: {msg}" for where, msg in problems.items())
