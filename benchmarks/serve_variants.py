"""The Serve deployments of bench_serve.py besides raykd.serve.build_app's: a constant answer
(Serve's own floor), the two-hop graph (ingress -> model through a DeploymentHandle), the student
deployment with user code on Serve's event loop, and the replica options they all share.

Ray workers do not have benchmarks/ on sys.path, so serve_variants() registers this module with
ray.cloudpickle to be pickled by value (as bench_serve.py itself, __main__, always is).
"""

# No `from __future__ import annotations`: FastAPI must resolve the `Request` annotations of the
# endpoints defined inside functions below.
import json
import os
import sys

from serve_catalogue import K


def _const_deployment():
    """Serve's own floor: a FastAPI ingress that reads the body and answers a constant."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    const_app = FastAPI()

    @serve.deployment(name="constant")
    @serve.ingress(const_app)
    class Constant:
        def __init__(self):
            self.answer = {"items": list(range(K)), "scores": [0.0] * K, "model": "constant", "unknown_items": []}

        @const_app.post("/recommend")
        async def recommend(self, request: Request) -> JSONResponse:
            await request.body()
            return JSONResponse(self.answer)

        @const_app.get("/healthz")
        async def healthz(self) -> dict:
            import torch
            return {"status": "ok", "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    return Constant


def _two_hop_deployments():
    """The design alternative: an ingress deployment (HTTP + JSON) calling a model deployment
    (parse + @serve.batch scoring) through a DeploymentHandle."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    @serve.deployment(name="model")
    class Model:
        """Parse + batched scoring, behind a handle."""

        def __init__(self, path: str, settings: dict):
            from raykd.config import ServeConfig
            from raykd.serve.recommender import Recommender
            cfg = ServeConfig(**settings)
            self.rec = Recommender(path, cfg.max_k, cfg.max_history)
            self._batched.set_max_batch_size(cfg.max_batch_size)
            self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def _batched(self, parsed: list) -> list[dict]:
            return self.rec.recommend_many(parsed)

        async def recommend(self, data: dict) -> tuple[int, dict]:
            from raykd.serve.recommender import BadRequest
            try:
                parsed = self.rec.parse(data)
            except BadRequest as err:
                return err.status, {"error": err.message}
            return 200, await self._batched(parsed)

    ingress_app = FastAPI()

    @serve.deployment(name="ingress")
    @serve.ingress(ingress_app)
    class Ingress:
        """HTTP + JSON only; scoring happens in the model deployment, one handle call per request."""

        def __init__(self, model):
            self.model = model

        @ingress_app.post("/recommend")
        async def recommend(self, request: Request) -> JSONResponse:
            try:
                data = json.loads(await request.body())
            except ValueError as err:
                return JSONResponse({"error": str(err)}, status_code=400)
            if not isinstance(data, dict):
                return JSONResponse({"error": "body must be an object"}, status_code=422)
            status, answer = await self.model.recommend.remote(data)
            return JSONResponse(answer, status_code=status)

        @ingress_app.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

    return Model, Ingress


def serve_variants():
    """Deployments defined inside the benchmark: the constant floor and the two-hop graph."""
    import ray.cloudpickle

    # Replicas cannot import this module (benchmarks/ is not on their sys.path): ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return (_const_deployment(), *_two_hop_deployments())


def student_one_loop(path: str, settings):
    """build_app's deployment, but the replica runs user code on its main event loop
    (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in the replica's runtime_env): no thread hop per
    request between Serve's loop and the user loop."""
    from raykd.serve.app import StudentDeployment
    opts = serve_options(settings)
    opts["ray_actor_options"] = {**opts["ray_actor_options"], "runtime_env": {
        "env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}
    return StudentDeployment.options(**opts).bind(path, settings.model_dump())


def serve_options(settings) -> dict:
    """The replica options raykd.serve.build_app uses, for the benchmark's own deployments."""
    return {"num_replicas": 1, "max_ongoing_requests": max(2 * settings.max_batch_size, 8),
            "ray_actor_options": {"num_cpus": settings.replica_cpus},
            "logging_config": {"enable_access_log": settings.access_log}}
