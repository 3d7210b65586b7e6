"""The plain server of bench_serve.py: FastAPI + uvicorn in one process, the same Recommender as
raykd.serve but no batching (every request is parsed and scored alone), or a constant answer.

    python benchmarks/serve_plain.py --port P (--path MODEL_DIR | --const) [--torch-threads N]

bench_serve.py starts it as a subprocess (`bench_serve.py _plain ...` still works too).
"""

# No `from __future__ import annotations`: FastAPI must resolve the `Request` annotation of the
# endpoint defined inside plain_main.
import argparse
import json
import os
import sys

from serve_catalogue import K


def plain_main(argv: list[str], prog: str = "serve_plain.py") -> None:
    """FastAPI + uvicorn on 127.0.0.1:--port, one process, until terminated."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--path")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--const", action="store_true")
    p.add_argument("--torch-threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from raykd.config import ServeConfig
    from raykd.serve.recommender import BadRequest, Recommender

    torch.set_num_threads(a.torch_threads)
    settings = ServeConfig()
    rec = None if a.const else Recommender(a.path, settings.max_k, settings.max_history)
    app = FastAPI()
    constant = {"items": list(range(K)), "scores": [0.0] * K, "model": "constant", "unknown_items": []}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "torch_threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    @app.post("/recommend")
    async def recommend(request: Request) -> JSONResponse:
        body = await request.body()
        if rec is None:
            return JSONResponse(constant)
        if len(body) > settings.max_body_bytes:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            data = json.loads(body)
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        if not isinstance(data, dict):
            return JSONResponse({"error": "body must be an object"}, status_code=422)
        try:
            parsed = rec.parse(data)
        except BadRequest as err:
            return JSONResponse({"error": err.message}, status_code=err.status)
        return JSONResponse(rec.recommend_many([parsed])[0])

    uvicorn.run(app, host="127.0.0.1", port=a.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    plain_main(sys.argv[1:])
