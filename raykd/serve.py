"""serve: the student behind a Ray Serve HTTP endpoint (FastAPI ingress, batching, autoscaling).

Reads a run directory (its `tune/best/` if present, else `student/`) or a model folder, and the
run's `data/` for the item vocabulary and known user histories. Endpoints:

    POST /recommend  {"history": [raw item ids, oldest first] | "user_id": id, "k": 10, "exclude_seen": true}
                     -> {"items": [raw ids], "scores": [...], "model": id, "unknown_items": [...]}
    GET  /healthz, GET /model, GET /docs and /openapi.json (FastAPI)

One deployment does both HTTP and scoring: a separate model deployment behind a handle costs a
second hop per request (measured in benchmarks/bench_serve.py). Concurrent requests are scored
together by `@serve.batch`; replicas scale between min and max on ongoing requests.
Three ways to run it: `raykd serve PATH`, `serve run configs/serve.yaml` (the `app_builder`
below), or `serve.run(build_app(path, ServeConfig()))` from Python.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations
# through Serve's ingress wrapper.
import json
import os
import signal
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict
from ray import serve

from raykd.config import ServeConfig
from raykd.recommender import BadRequest, Recommender, RecommendRequest

API_KEY_ENV = "RAYKD_API_KEY"
app = FastAPI(title="raykd", description="Recommendations from a distilled student model.")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(name="recommender")
@serve.ingress(app)
class StudentDeployment:
    """One replica: loads the student once, validates requests, scores them in batches."""

    def __init__(self, student_path: str, settings: dict):
        self.settings = ServeConfig(**settings)
        self.rec = Recommender(student_path, self.settings.max_k, self.settings.max_history)
        self.api_key = self.settings.api_key or os.environ.get(API_KEY_ENV)
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, requests: list[tuple]) -> list[dict]:
        return self.rec.recommend_many(requests)

    def _authorised(self, request: Request) -> bool:
        return not self.api_key or request.headers.get("authorization") == f"Bearer {self.api_key}"

    @app.post("/recommend", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": RecommendRequest.model_json_schema()}}}})
    async def recommend(self, request: Request) -> JSONResponse:
        if not self._authorised(request):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <key>)")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return _error(413, f"body over {self.settings.max_body_bytes} bytes; send fewer history items")
        body = await request.body()
        if len(body) > self.settings.max_body_bytes:
            return _error(413, f"body over {self.settings.max_body_bytes} bytes; send fewer history items")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            return _error(400, f"body is not valid JSON ({err}); send e.g. {{\"history\": [1, 2], \"k\": 10}}")
        if not isinstance(data, dict):
            return _error(422, "body must be a JSON object with 'history' or 'user_id'")
        try:
            parsed = self.rec.parse(data)
        except BadRequest as err:
            return _error(err.status, err.message)
        return JSONResponse(await self._batched(parsed))

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.rec.model_id}

    @app.get("/model")
    async def model(self, request: Request) -> JSONResponse:
        if not self._authorised(request):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <key>)")
        return JSONResponse(self.rec.describe())


def build_app(student_path: str, settings: ServeConfig) -> serve.Application:
    """The Serve application for a student folder or run directory, with autoscaling."""
    deployment = StudentDeployment.options(
        autoscaling_config={"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
                            "target_ongoing_requests": settings.target_ongoing_requests},
        max_ongoing_requests=max(2 * settings.max_batch_size, 8),
        ray_actor_options={"num_cpus": settings.replica_cpus},
        logging_config={"enable_access_log": settings.access_log},
    )
    return deployment.bind(str(student_path), settings.model_dump())


class AppArgs(ServeConfig):
    """Arguments of `app_builder` (Serve config files, `serve run raykd.serve:app_builder ...`)."""

    model_config = ConfigDict(extra="forbid")
    path: str


def app_builder(args: dict) -> serve.Application:
    """Typed application builder: `args` are validated like any raykd config section."""
    parsed = AppArgs.model_validate(args)
    return build_app(parsed.path, ServeConfig(**parsed.model_dump(exclude={"path"})))


def deploy(path: str, settings: ServeConfig) -> Path:
    """Deploy the student of `path` (a run or model folder) as the Serve app `raykd`; no blocking."""
    from raykd.recommender import resolve_student

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
    from raykd.recommender import resolve_student
    from raykd.runtime import ensure_ray

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
