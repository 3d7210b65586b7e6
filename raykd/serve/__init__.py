"""Serving: the plain-Python `Recommender`, batch recommendation, bundles, and the Ray Serve app.

`raykd.serve:app_builder` (the import path Serve config files and KubeRay use), `build_app`,
`AppArgs` and `run_blocking` live in `raykd.serve.app`; they are re-exported here lazily, so
importing `raykd.serve.recommender` or `raykd.serve.bundle` does not import Ray Serve.
"""
from __future__ import annotations

_APP_NAMES = ("app_builder", "build_app", "AppArgs", "run_blocking")


def __getattr__(name: str):
    if name in _APP_NAMES:
        from raykd.serve import app
        return getattr(app, name)
    raise AttributeError(f"module 'raykd.serve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_APP_NAMES])
