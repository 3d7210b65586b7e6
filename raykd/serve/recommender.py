"""A servable student: model + vocabulary + known user histories, and request validation.

Plain Python (no Ray): the Ray Serve deployment (raykd.serve) and any other server or batch
job use the same `Recommender` so answers never depend on how they are served.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import tempfile
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

from raykd.core import ann as approx
from raykd.core import histories as flat_histories
from raykd.core import id_index, ids, models, rundir, scoring
from raykd.core.errors import RaykdError

MIN_ROWS = scoring.MIN_ROWS  # rows of the smallest forward pass (see Recommender._scores)
DEFAULT_K = 10  # a request's k when it gives none (at most the deployment's max_k)
MODEL_FILES = (rundir.WEIGHTS, rundir.MODEL_JSON, rundir.METRICS, rundir.MANIFEST)  # read as one version


def _valid_text(raw: str) -> str:
    if problem := ids.problem(raw):
        raise ValueError(problem)
    return raw


def _whole(value: Any) -> Any:
    # JSON Schema counts 7.0 as an integer, so the API does too (never True, never "7" for k)
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[StrictInt, BeforeValidator(_whole)]
# raykd.core.ids rule 4: 64-bit integers, or bounded valid Unicode text
RawId = (Annotated[StrictInt, Field(ge=ids.INT64_MIN, le=ids.INT64_MAX), BeforeValidator(_whole)]
         | Annotated[StrictStr, Field(max_length=ids.MAX_ID_CHARS), AfterValidator(_valid_text)])


class RecommendRequest(BaseModel):
    """Body of POST /recommend: a history of raw item ids (oldest first) or a known user id.

    Ids follow raykd.core.ids: user ids are matched in the user vocabulary, item ids in the item
    vocabulary, each by its own type; an id that cannot be in the vocabulary is simply unknown.
    """

    model_config = ConfigDict(extra="forbid")
    history: list[RawId] | None = Field(None, description="raw item ids, oldest first (at most serve.max_history)")
    user_id: RawId | None = Field(None, description="a user of the prepared data: its whole known history is used")
    k: Integer = Field(DEFAULT_K, ge=1, description="how many items (at most serve.max_k; default 10, or "
                       "serve.max_k when that is smaller)")
    exclude_seen: StrictBool | None = Field(None, description="never recommend an item of the history (default: "
                                            "the deployment's serve.exclude_seen, true unless set)")

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
    props["k"]["default"] = min(DEFAULT_K, max_k)  # what `Recommender.parse` uses when k is not given
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


class BatchError(BaseModel):
    """A bad entry of POST /recommend/batch: what /recommend would have answered it, in its slot."""

    error: str
    status: int = Field(description="the HTTP status /recommend gives this body (404, 422)")


class BatchResponse(BaseModel):
    """Answer of POST /recommend/batch: one result per request, in order."""

    results: list[RecommendResponse | BatchError]


def batch_schema(max_batch_users: int = 256) -> dict:
    """JSON schema of the POST /recommend/batch body with a deployment's limit.

    Entries are any JSON value here: each is validated as a /recommend body on its own, and a bad
    one is answered in its slot (BatchError), so the whole batch is never refused for one entry.
    """
    return {"title": "RecommendBatchRequest", "type": "object", "additionalProperties": False,
            "required": ["requests"],
            "properties": {"requests": {
                "type": "array", "minItems": 1, "maxItems": max_batch_users, "items": {},
                "description": "POST /recommend bodies (RecommendRequest), answered in order; at most "
                               "serve.max_batch_users. A bad entry gets {\"error\", \"status\"} in its slot."}}}


def batch_entries(data: Any, limit: int) -> list:
    """The entries of a /recommend/batch body, or BadRequest(422) for the batch as a whole."""
    if not isinstance(data, dict) or set(data) != {"requests"}:
        raise BadRequest(422, "body must be a JSON object with one key, 'requests': a list of /recommend bodies, "
                              'e.g. {"requests": [{"user_id": 7, "k": 10}, {"history": [1, 2]}]}')
    entries = data["requests"]
    if not isinstance(entries, list) or not entries:
        raise BadRequest(422, f"'requests' must be a list of 1 to {limit} /recommend bodies")
    if len(entries) > limit:
        raise BadRequest(422, f"'requests' has {len(entries)} entries; at most {limit} per batch "
                              "(serve.max_batch_users): split it into smaller batches")
    return entries


def resolve_student(path: str | Path) -> Path:
    """A model folder or bundle is itself; a run directory serves what its run record lists as
    current: the tune winner, else the student (raykd.core.rundir.served_model)."""
    return rundir.served_model(path)


class Recommender:
    """Loads a student once; answers batches of validated requests.

    `path` is a run directory, a model folder or an exported bundle (raykd.serve.bundle). The item
    vocabulary and user histories come from `data_dir` when given, else from the model's own folder
    (a bundle) or its run's `data/`, as flat arrays (raykd.core.histories); `histories` gives them
    ready-made instead (a Serve replica maps the app's one copy from the object store), and
    `with_histories=False` skips them (a batch job that reads them shard by shard); `device` places
    the model (a GPU for batch jobs).

    The weights, model.json, metrics.json and the manifest are read as one version of the folder
    (`rundir.copy_snapshot`), even while a run publishes a new model there. `model_digest` (of
    `model_digest(path)`, taken once by a Serve app's builder) makes every replica load that same
    version: a folder that changed since raises.

    `ann` (serve.ann) answers from an approximate index (raykd.core.ann) instead of exact scoring:
    True loads the folder's `ann/` (a bundle exported with --ann; refused when built for another
    model or vocabulary) or builds one from the model's item table; a path loads the index saved
    there (`approx.Index.save`, checked likewise); an `approx.Index` is used as is.
    """

    def __init__(self, path: str | Path, max_k: int = 100, max_history: int = 1000, *,
                 data_dir: str | Path | None = None, with_histories: bool = True, device: str = "cpu",
                 exclude_seen: bool = True, model_digest: str | None = None,
                 ann: bool | str | Path | approx.Index = False, histories: flat_histories.Histories | None = None):
        self.model_dir = resolve_student(path)
        self.exclude_seen = exclude_seen  # a request's default: serve.exclude_seen, the rule evaluate scores by
        check_bundle(self.model_dir)
        self.device = torch.device(device)
        with tempfile.TemporaryDirectory(prefix="raykd-model-") as snap:
            self.digest = rundir.copy_snapshot(self.model_dir, Path(snap), MODEL_FILES)
            if model_digest and self.digest != model_digest:
                raise RaykdError(f"{self.model_dir} changed since the app was built (model digest {self.digest}, "
                                 f"expected {model_digest}: a new model was published there): deploy the app again "
                                 "to serve the new model, so that every replica serves the same one")
            self.model, self.desc = models.load_model(snap, self.device)
            manifest = rundir.read_manifest(Path(snap))
            self.metrics = _read_metrics(Path(snap) / rundir.METRICS)
        self.max_k, self.max_history = max_k, max_history
        self.block = scoring.BLOCK  # items per scoring window (raykd.core.scoring)
        data_dir = Path(data_dir) if data_dir is not None else find_data_dir(self.model_dir)
        items = pq.read_table(data_dir / rundir.ITEMS)
        if items.num_rows != self.desc["num_items"]:
            raise RaykdError(f"{self.model_dir} scores {self.desc['num_items']:,} items but the vocabulary "
                             f"{data_dir / 'items.parquet'} has {items.num_rows:,}: the model was trained on other "
                             "data; give the run directory (or bundle) it was trained in")
        self.item_ids = items["raw_id"].combine_chunks()  # Arrow: item index i is row i - 1
        self.item_index = id_index.build(self.item_ids)
        trained_on = manifest.get("vocab_digest")
        if trained_on and trained_on != (now := self.vocab_digest):
            fix = ("Export the bundle again from the run the model was trained in (`raykd export RUN_DIR --out DIR`)"
                   if manifest.get("kind") == "bundle" else "Retrain it (`raykd distill CONFIG`), or serve a bundle "
                   "exported before the data changed, which carries its own vocabulary")
            raise RaykdError(f"{self.model_dir} was trained on another item vocabulary (digest {trained_on}) than "
                             f"{data_dir / 'items.parquet'} holds (digest {now}; the data was prepared again, or "
                             f"items.parquet was replaced): its answers would name the wrong items. {fix}")
        self.int_items = pa.types.is_integer(items.schema.field("raw_id").type)
        users = data_dir / rundir.USERS
        self.int_users = users.exists() and pa.types.is_integer(pq.read_schema(users).field("raw_id").type)
        counts = items["count"].to_numpy()
        self.popular = np.argsort(-counts, kind="stable") + 1
        self.popular_scores = counts[self.popular - 1].astype(float)
        self.histories = histories if histories is not None else _user_histories(data_dir) if with_histories else None
        if isinstance(ann, str | Path):
            ann = approx.load(Path(ann), self.model.item_table(), self.vocab_digest)
        elif ann is True:
            ann = approx.load_or_build(self.model_dir, self.model, self.desc, self.vocab_digest, data_dir)
        self.ann = ann or None  # None: exact scoring
        tag = hashlib.sha256(str(self.desc.get("fingerprint")).encode()).hexdigest()[:8]
        self.model_id = f"{self.model_dir.name}-{self.desc['family']}{self.desc['dim']}x{self.desc['layers']}-{tag}"

    def parse(self, body: dict[str, Any]) -> tuple[np.ndarray, list, int, bool]:
        """Validate a request body -> (item indices, unknown raw ids, k, exclude_seen)."""
        try:
            req = RecommendRequest.model_validate(body)
        except ValidationError as err:
            raise BadRequest(422, _explain(err)) from None
        k = req.k if "k" in req.model_fields_set else min(DEFAULT_K, self.max_k)
        if not 1 <= k <= self.max_k:
            raise BadRequest(422, f"k must be between 1 and {self.max_k}, got {k}")
        if req.user_id is not None:
            key = ids.lookup_key(req.user_id, self.int_users)
            history = None if self.histories is None else self.histories.get(key)
            if history is None:
                raise BadRequest(404, f"unknown user_id {req.user_id!r}: send its 'history' instead")
            return history, [], k, self._exclude(req)
        if len(req.history) > self.max_history:
            raise BadRequest(422, f"history has {len(req.history)} items; at most {self.max_history} are "
                                  "accepted (send the most recent ones)")
        rows = self.item_index.rows_of([ids.lookup_key(raw, self.int_items) for raw in req.history])
        unknown = [raw for raw, row in zip(req.history, rows.tolist()) if row < 0]
        return rows[rows >= 0] + 1, unknown, k, self._exclude(req)

    @functools.cached_property
    def vocab_digest(self) -> str:
        """The item vocabulary's digest (rundir.vocab_digest), computed when first asked for."""
        return rundir.vocab_digest(self.item_ids.to_pylist())

    def item_of(self, raw: int | str) -> int | None:
        """The item index of a raw item id (raykd.core.ids rule 3), or None for an unknown one."""
        row = self.item_index.row(ids.lookup_key(raw, self.int_items))
        return None if row is None else row + 1

    def raw_item(self, index: int) -> int | str:
        """The raw id of item index `index` (1..num_items)."""
        return self.item_ids[index - 1].as_py()

    def _exclude(self, req: RecommendRequest) -> bool:
        return self.exclude_seen if req.exclude_seen is None else req.exclude_seen

    def recommend_batch(self, entries: list) -> list[dict]:
        """Answers to /recommend bodies, in order, scored in one forward pass; a bad entry gets its error.

        Each entry is validated exactly as POST /recommend validates its body; one that fails gets
        {"error": message, "status": what /recommend would answer} in its slot, the others their answer.
        """
        results: list[dict | None] = [None] * len(entries)
        parsed, slots = [], []
        for i, entry in enumerate(entries):
            try:
                if not isinstance(entry, dict):
                    raise BadRequest(422, "body must be a JSON object with 'history' or 'user_id'")
                parsed.append(self.parse(entry))
                slots.append(i)
            except BadRequest as err:
                results[i] = {"error": err.message, "status": err.status}
        for i, answer in zip(slots, self.recommend_many(parsed) if parsed else []):
            results[i] = answer
        return results

    @torch.no_grad()
    def recommend_many(self, requests: list[tuple[np.ndarray, list, int, bool]]) -> list[dict]:
        """Score a batch of parsed requests in one forward pass; popularity for empty histories.

        One top-k of the largest k for the whole batch, seen items excluded inside it, cut per
        request to its k and to the items left unmasked. Ties go to the lower item index.
        """
        out: list[dict | None] = [None] * len(requests)
        rows = [i for i, (hist, *_rest) in enumerate(requests) if len(hist)]
        if rows:
            hists = [np.asarray(requests[i][0], dtype=np.int64) for i in rows]
            seen = [h if requests[i][3] else h[:0] for h, i in zip(hists, rows)]
            values, indices = self._top_k(hists, seen, max(requests[i][2] for i in rows))
            values, indices = values.cpu().numpy(), indices.cpu().numpy()
            finite = np.isfinite(values).sum(1)
            for r, i in enumerate(rows):
                n = min(requests[i][2], int(finite[r]))
                out[i] = self._answer(indices[r, :n], values[r, :n], requests[i][1], None)
        for i, (hist, unknown, k, _) in enumerate(requests):
            if out[i] is None:
                out[i] = self._answer(self.popular[:k], self.popular_scores[:k], unknown, "popularity")
        return out

    def _top_k(self, hists: list[np.ndarray], seen: list[np.ndarray], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per history, the k best items (scores with NaN and infinities at -inf) and their scores.

        Scored in windows of `self.block` items (raykd.core.scoring.blocked_top_k), so a batch's
        memory does not grow with the catalogue; the answer is the whole score matrix's top_k.
        A history whose every score is NaN or infinite (a corrupt model, or a corrupt item in it)
        raises: there is nothing to rank, and an empty answer would hide the corruption.
        With an approximate index (`self.ann`), the index answers instead (raykd.core.ann: the same
        shapes, seen items excluded); a history whose hidden state is not finite raises likewise.
        """
        scores = self._scores(hists)
        corrupt = (f"model {self.model_id} ({self.model_dir}) scores NaN or infinity for every item of a history: "
                   "the model is corrupt; retrain it, or serve another model or bundle")
        if self.ann is not None:
            queries = scores.queries[: len(hists)]
            if not bool(torch.isfinite(queries).all()):
                raise RaykdError(corrupt)
            return self.ann.search(queries, k, seen)
        scores = scores.head(len(hists))  # the padding rows (_scores) are never selected over
        all_bad = torch.ones(scores.rows, dtype=torch.bool, device=self.device)

        def usable(start: int, window: torch.Tensor) -> None:
            rows = scoring.nonfinite_rows(window)  # only these are read entry by entry
            bad = ~torch.isfinite(window[rows])
            still_bad = all_bad[rows] & (bad[:, 1:] if start == 0 else bad).all(1)
            all_bad.zero_()
            all_bad[rows] = still_bad
            if len(rows):
                window[rows] = window[rows].masked_fill(bad, -torch.inf)

        values, indices = scoring.blocked_top_k(scores, k, seen, self.block, on_block=usable)
        if all_bad.any():
            raise RaykdError(corrupt)
        return values, indices

    def _scores(self, hists: list[np.ndarray]) -> scoring.Scores:
        """Next-item scores of the histories (at least MIN_ROWS rows), the same whatever batch a
        history is scored in, to be read a window at a time.

        BLAS takes another path for products of a few rows (a matrix-vector kernel for one row),
        whose last bits differ from the batched one's: a forward pass of fewer than MIN_ROWS
        histories is padded to MIN_ROWS with copies of the first, so a user's answer never depends
        on which requests it was batched with (checked on the CPUs measured, dims 4 to 128).
        """
        padded = models.left_pad(hists, self.desc["max_len"])
        if len(hists) < MIN_ROWS:
            padded = torch.cat([padded, padded[:1].expand(MIN_ROWS - len(hists), -1)])
        padded = padded.to(self.device)
        dot = scoring.dot_scores(self.model, padded)
        return dot if dot is not None else scoring.FullScores(self.model.last_scores(padded).float())

    def _answer(self, idx: np.ndarray, scores: np.ndarray, unknown: list, fallback: str | None) -> dict:
        items = self.item_ids.take(pa.array(idx - 1, pa.int64())).to_pylist()
        answer = {"items": items, "scores": [round(float(s), 5) for s in scores], "model": self.model_id,
                  "unknown_items": unknown}
        if fallback:
            answer["fallback"] = fallback
        return answer

    def describe(self) -> dict:
        """What GET /model answers: the loaded model's own metrics (read with its weights), JSON-safe;
        with an approximate index, `ann`: its settings and recall@10 against exact, measured at build."""
        ann = {"ann": {k: v for k, v in self.ann.meta.items() if "digest" not in k}} if self.ann else {}
        return json_safe({"model": self.model_id, "path": str(self.model_dir), "description": self.desc,
                          "params": models.count_params(self.model), "items": len(self.item_ids),
                          "users_with_history": len(self.histories or ()), "metrics": self.metrics,
                          "limits": {"max_k": self.max_k, "max_history": self.max_history}, **ann})


def _read_metrics(path: Path) -> dict:
    """The validation summary of a model's metrics.json ({} when it has none or it is unreadable)."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return json_safe({"valid": m.get("valid"), "best_epoch": m.get("best_epoch")}) if isinstance(m, dict) else {}


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None: strict JSON (an answer with NaN would be a 500)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def model_digest(path: str | Path) -> str:
    """The digest of the model a path serves, as `Recommender` computes it: one version of the folder."""
    with tempfile.TemporaryDirectory(prefix="raykd-model-") as snap:
        return rundir.copy_snapshot(resolve_student(path), Path(snap), MODEL_FILES)


def find_data_dir(model_dir: Path) -> Path:
    """Where the item vocabulary is: the model folder itself (a bundle) or its run's `data/`."""
    # a model folder: teacher/, tune/best/, or kd_curve/d<width>/student/ three levels down
    for candidate in (model_dir, *(model_dir.parents[i] / "data" for i in range(min(3, len(model_dir.parents))))):
        if (candidate / rundir.ITEMS).exists():
            return candidate
    raise RaykdError(f"no item vocabulary (items.parquet) next to {model_dir} or in its run's data/: give the "
                     "run directory the model was trained in, or a bundle from `raykd export RUN_DIR --out DIR`")


def check_bundle(folder: Path) -> None:
    """A bundle (it has manifest.json) must hold every file its manifest lists."""
    try:
        listed = json.loads((folder / rundir.MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError):
        return  # not a bundle: a model folder of a run
    missing = sorted(name for name in listed if not (folder / name).exists())
    if missing:
        raise RaykdError(f"bundle {folder} is incomplete: {', '.join(missing[:5])} missing; copy the whole "
                         "folder, or export it again with `raykd export RUN_DIR --out DIR`")


def _user_histories(data_dir: Path) -> flat_histories.Histories | None:
    """Every prepared user's full known history (train + valid + test) in flat arrays; None if not prepared."""
    return flat_histories.read(data_dir)


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
