"""serve: the student behind a Ray Serve HTTP endpoint (FastAPI ingress, batching, autoscaling).

Reads a run directory (its `tune/best/` if present, else `student/`) or a model folder, and the
run's `data/` for the item vocabulary and known user histories. Endpoints:

    POST /recommend  {"history": [raw item ids, oldest first] | "user_id": id, "k": 10, "exclude_seen": true}
                     -> {"items": [raw ids], "scores": [...], "model": id, "unknown_items": [...]}
    POST /recommend/batch  {"requests": [<a /recommend body>, ...]} (at most serve.max_batch_users)
                     -> {"results": [<its answer> | {"error": "...", "status": 4xx}, ...]} in order
    GET  /healthz, GET /model, GET /docs and /openapi.json (with this deployment's limits)

Hostile input gets a 4xx with {"error": "..."}, never a 5xx: ids follow one rule (raykd.core.ids), the
body is read as a stream and cut at serve.max_body_bytes (chunked or not), and every answer and
error is declared in the OpenAPI schema. Auth fails closed (raykd.config.auth): with a key, /recommend,
/recommend/batch and /model need `Authorization: Bearer <key>` (scheme in any case, constant-time comparison);
without one, only a loopback bind is allowed.

One deployment does both HTTP and scoring: a separate model deployment behind a handle costs a
second hop per request (measured in benchmarks/bench_serve.py). Concurrent requests are scored
together by `@serve.batch`; /recommend/batch scores its valid entries in one forward pass, past the
proxy's per-request cost. Replicas scale between min and max on ongoing requests. A run
directory, a model folder and an exported bundle (`raykd export`) are served alike.
Three ways to run it: `raykd serve PATH`, `serve run configs/serve.yaml` (the `app_builder`
below), or `serve.run(build_app(path, ServeConfig()))` from Python.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations
# through Serve's ingress wrapper.
import copy
import json
import signal
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from ray import serve
from starlette.requests import ClientDisconnect

from raykd.config import ServeConfig, auth
from raykd.core import console
from raykd.core import histories as flat_histories
from raykd.core.errors import RaykdError
from raykd.serve.recommender import (
    BadRequest,
    BatchResponse,
    Recommender,
    RecommendResponse,
    batch_entries,
    batch_schema,
    find_data_dir,
    model_digest,
    request_schema,
    resolve_student,
)

DEFAULT_MAX_BATCH_USERS = 256  # until ServeConfig has serve.max_batch_users

# /openapi.json and /docs are served by the deployment itself, with this deployment's limits
app = FastAPI(title="raykd", description="Recommendations from a distilled student model. Ids follow raykd.core.ids; "
              "with an API key, /recommend, /recommend/batch and /model need `Authorization: Bearer <key>`.",
              openapi_url=None, docs_url=None, redoc_url=None)


class ErrorResponse(BaseModel):
    """Every 4xx answer: what to fix."""

    error: str


class Health(BaseModel):
    status: str
    model: str


def _errors(*codes: int) -> dict:
    what = {400: "body is not JSON", 401: "missing or wrong bearer key", 404: "unknown user_id",
            413: "body over serve.max_body_bytes", 422: "body does not follow the schema or the limits",
            500: "the model is corrupt (it scores NaN)"}
    return {c: {"model": ErrorResponse, "description": what[c]} for c in codes}


def _safe(message: str) -> str:
    # never echo text that cannot be encoded (a lone surrogate in a client's key name) or is huge
    return message.encode("utf-8", "backslashreplace").decode("utf-8")[:2000]


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": _safe(message)}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, read as a stream and cut at `limit` bytes (None: over the limit), chunked or not."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _proxy_host() -> str | None:
    """The address Serve's HTTP proxies bind (None: Serve not running or not reachable)."""
    from raykd.cluster import ray_private

    return ray_private.serve_proxy_host()


def share_histories(student: Path) -> list | None:
    """The users' histories read once and put in the object store: [ObjectRef], or None without Ray or histories.

    Every replica maps this one copy (flat NumPy arrays, zero-copy) instead of reading its own. The
    object lives as long as the process that built the app (`raykd serve`, `serve run`, a Python
    `serve.run`): the ref travels in a list, so Serve passes it on as is and a replica resolves it.
    """
    import ray

    if not ray.is_initialized():
        return None
    try:
        data_dir = find_data_dir(student)
    except RaykdError:
        return None  # Recommender says what is missing, in the replica
    t0 = time.perf_counter()
    histories = flat_histories.read(data_dir)
    if histories is None:
        return None
    ref = ray.put(histories)
    console.say(f"serve: {len(histories):,} users' histories ({histories.nbytes() / 2**20:,.0f} MiB) read in "
                f"{time.perf_counter() - t0:.1f}s, shared by every replica through the object store")
    return [ref]


def shared_histories(shared: list | None) -> "flat_histories.Histories | None":
    """The app's one copy of the histories (zero-copy from the object store); None: the replica reads its own.

    A replica started after the builder's process ended (a Serve config deployed with `serve deploy`,
    whose build task is gone) finds the object lost and reads the histories itself.
    """
    if not shared:
        return None
    import ray

    try:
        return ray.get(shared[0], timeout=120)
    except ray.exceptions.RayError as err:
        console.warn(f"serve: the shared histories are gone ({type(err).__name__}): this replica reads its own copy")
        return None


@serve.deployment(name="recommender")
@serve.ingress(app)
class StudentDeployment:
    """One replica: loads the student once, validates requests, scores them in batches."""

    def __init__(self, student_path: str, settings: dict, verifier: tuple[bytes, bytes] | None = None,
                 digest: str | None = None, histories: list | None = None):
        self.settings = ServeConfig.model_construct(**settings)  # validated by the builder; holds no key
        # the replica's own key (environment or file) first; else the builder's verifier of a config key
        key = auth.resolve_key(None, self.settings.api_key_file)
        self.verifier = auth.Verifier.for_key(key) if key else auth.Verifier(*verifier) if verifier else None
        if self.verifier is None:  # fail closed, whatever the builder saw
            auth.require_key(_proxy_host() or self.settings.host, None, "Serve's HTTP proxy host")
        self.rec = Recommender(student_path, self.settings.max_k, self.settings.max_history,
                               exclude_seen=getattr(self.settings, "exclude_seen", True), model_digest=digest,
                               ann=getattr(self.settings, "ann", False), histories=shared_histories(histories))
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, requests: list[tuple]) -> list[dict]:
        return self.rec.recommend_many(requests)

    def _refused(self, request: Request) -> JSONResponse | None:
        if self.verifier is None or self.verifier.accepts(request.headers.get("authorization")):
            return None
        return _error(401, "missing or wrong API key: send `Authorization: Bearer <key>`")

    @app.post("/recommend", response_model=RecommendResponse, responses=_errors(400, 401, 404, 413, 422, 500),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": request_schema()}}}})
    async def recommend(self, request: Request) -> JSONResponse:
        if refused := self._refused(request):
            return refused
        data = await self._json(request, "send fewer history items", '{"history": [1, 2], "k": 10}')
        if isinstance(data, JSONResponse):
            return data
        if not isinstance(data, dict):
            return _error(422, "body must be a JSON object with 'history' or 'user_id'")
        try:
            parsed = self.rec.parse(data)
        except BadRequest as err:
            return _error(err.status, err.message)
        try:
            return JSONResponse(await self._batched(parsed))
        except RaykdError as err:  # a corrupt model (NaN scores): say so, never invalid JSON
            return _error(500, str(err))

    @app.post("/recommend/batch", response_model=BatchResponse, responses=_errors(400, 401, 413, 422, 500),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": batch_schema()}}}})
    async def recommend_batch(self, request: Request) -> JSONResponse:
        """Many /recommend bodies in one request, answered in order and scored in one forward pass."""
        if refused := self._refused(request):
            return refused
        data = await self._json(request, "send fewer requests per batch", '{"requests": [{"user_id": 7}]}')
        if isinstance(data, JSONResponse):
            return data
        try:
            entries = batch_entries(data, self._max_batch_users())
        except BadRequest as err:
            return _error(err.status, err.message)
        try:
            results = self.rec.recommend_batch(entries)
        except RaykdError as err:  # a corrupt model (NaN scores)
            return _error(500, str(err))
        for r in results:
            if "error" in r:
                r["error"] = _safe(r["error"])
        return JSONResponse({"results": results})

    async def _json(self, request: Request, fix: str, example: str) -> object:
        """The body as JSON (any value), or the 400/413 answer: read as a stream, cut at max_body_bytes."""
        try:
            body = await _read_body(request, self.settings.max_body_bytes)
        except ClientDisconnect:
            return _error(400, "the client went away before sending the whole body")
        if body is None:
            return _error(413, f"body over {self.settings.max_body_bytes} bytes; {fix}")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as err:  # RecursionError: JSON nested thousands deep
            return _error(400, f"body is not valid JSON ({str(err)[:200]}); send e.g. {example}")

    def _max_batch_users(self) -> int:
        return int(getattr(self.settings, "max_batch_users", None) or DEFAULT_MAX_BATCH_USERS)

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.rec.model_id}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        spec = copy.deepcopy(request.app.openapi())
        body = spec["paths"]["/recommend"]["post"]["requestBody"]["content"]["application/json"]
        body["schema"] = request_schema(self.settings.max_k, self.settings.max_history)
        batch = spec["paths"]["/recommend/batch"]["post"]["requestBody"]["content"]["application/json"]
        batch["schema"] = batch_schema(self._max_batch_users())
        if root := request.scope.get("root_path", "").rstrip("/"):  # an app under a route prefix
            spec["servers"] = [{"url": root}]
        return JSONResponse(spec)

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="raykd")

    @app.get("/model", responses={200: {"description": "the model, its size, metrics and limits"}, **_errors(401)})
    async def model(self, request: Request) -> JSONResponse:
        if refused := self._refused(request):
            return refused
        info = self.rec.describe()
        info["limits"]["max_batch_users"] = self._max_batch_users()
        return JSONResponse(info)


def build_app(student_path: str, settings: ServeConfig) -> serve.Application:
    """The Serve application for a student folder or run directory, with autoscaling.

    Fails closed: with no API key, both `settings.host` and the running Serve proxy's host must be
    loopback. The key never enters the deployment's arguments: replicas read it from their
    environment or `api_key_file`, and fall back on a salted SHA-256 verifier of the builder's key.
    The model folder and its digest are resolved here, once: every replica, late ones included,
    loads that folder and refuses to start on another version of it (a model published since).
    The users' histories are read here once too and shared through the object store (`share_histories`).
    """
    inline = settings.api_key.get_secret_value() if settings.api_key else None
    key = auth.resolve_key(inline, settings.api_key_file)
    auth.require_key(settings.host, key)
    if key is None and (proxy := _proxy_host()):
        auth.require_key(proxy, key, "Serve's HTTP proxy host")
    verifier = None
    if key is not None:  # for replicas that find no key of their own (a node without the variable)
        v = auth.Verifier.for_key(key)
        verifier = (v.salt, v.digest)
    deployment = StudentDeployment.options(
        autoscaling_config={"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
                            "target_ongoing_requests": settings.target_ongoing_requests},
        max_ongoing_requests=max(2 * settings.max_batch_size, 8),
        ray_actor_options={"num_cpus": settings.replica_cpus},
        logging_config={"enable_access_log": settings.access_log},
    )
    student = resolve_student(student_path).resolve()
    return deployment.bind(str(student), settings.model_dump(exclude={"api_key"}), verifier, model_digest(student),
                           share_histories(student))


class AppArgs(ServeConfig):
    """Arguments of `app_builder` (Serve config files, `serve run raykd.serve:app_builder ...`).

    A Serve config file's args are stored by Serve and shown by `serve status`: the key itself is
    refused here; give replicas RAYKD_API_KEY / RAYKD_API_KEY_FILE or `api_key_file`.
    """

    model_config = ConfigDict(extra="forbid")
    path: str


def app_builder(args: dict) -> serve.Application:
    """Typed application builder: `args` are validated like any raykd config section."""
    if "api_key" in args:
        raise RaykdError("api_key in a Serve config file's args is stored and shown by Serve: remove it and give "
                         "the key as RAYKD_API_KEY / RAYKD_API_KEY_FILE or api_key_file (a mounted secret)")
    parsed = AppArgs.model_validate(args)
    return build_app(parsed.path, ServeConfig(**parsed.model_dump(exclude={"path"})))


def deploy(path: str, settings: ServeConfig) -> Path:
    """Deploy the student of `path` (a run or model folder) as the Serve app `raykd`; no blocking."""
    student = resolve_student(path).resolve()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(str(student), settings), name="raykd", route_prefix="/", blocking=False)
    return student


def wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


def run_blocking(path: str, settings: ServeConfig) -> None:
    """`raykd serve`: deploy, print the URL, block until Ctrl-C, shut down cleanly."""
    from raykd.cluster.runtime import ensure_ray

    resolve_student(path)  # fail before Ray starts
    ensure_ray()
    student = deploy(path, settings)
    print(f"raykd serve: {student} at http://{settings.host}:{settings.port}/recommend "
          f"(docs: http://{settings.host}:{settings.port}/docs); Ctrl-C to stop", flush=True)
    try:
        wait_for_stop()
    finally:
        print("raykd serve: shutting down", flush=True)
        serve.shutdown()
