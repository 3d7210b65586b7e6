"""The `raykd` command: one subcommand per stage, each `raykd STAGE CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from raykd.errors import RaykdError

# commands on a finished run: module with add_arguments(parser) and main(args), help
TOOLS = {
    "recommend": ("raykd.recommend", "top-k for every user (or a list) as Parquet, on a Ray Data actor pool"),
    "export": ("raykd.export", "a self-contained model bundle (safetensors, TorchScript or ONNX)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.command = args.command.replace("-", "_") if args.command not in TOOLS else args.command
    try:
        if args.command == "synth":
            return _synth(args)
        from raykd.config import load_config

        if args.command == "serve":
            return _serve(args)
        if args.command == "config":
            return _config(args)
        if args.command in TOOLS:  # commands on a finished run: RUN_DIR and flags, not a config
            return importlib.import_module(TOOLS[args.command][0]).main(args) or 0

        cfg = load_config(args.config, args.overrides)
        if args.command == "pipeline":
            from raykd import pipeline

            pipeline.run(cfg)
        else:
            from raykd import stages

            stages.run(cfg, [args.command])
        return 0
    except RaykdError as err:
        if args.debug:
            traceback.print_exc()
        print(f"raykd {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"raykd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug, not bad input: still no traceback unless asked
        if args.debug:
            traceback.print_exc()
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print(f"raykd {args.command}: internal error: {type(err).__name__}: {lines[-1][:300] if lines else ''}. "
              "This is probably a bug in raykd; rerun with --debug for the traceback.", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raykd", description="Knowledge distillation for recommenders on Ray.")
    parser.add_argument("--version", action="version", version=f"raykd {_version()}")
    sub = parser.add_subparsers(dest="command")
    from raykd.stages import STAGES

    commands = [(s.name, s.help) for s in STAGES] + [("pipeline", "every stage in order, reusing finished ones")]
    for name, help_text in commands:
        dashed = [name.replace("_", "-")] if "_" in name else []  # `raykd soft-labels` works too
        p = sub.add_parser(name, aliases=dashed, help=help_text, description=help_text)
        p.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=x.csv teacher.train.lr=3e-4")
        p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    for name, (module, help_text) in TOOLS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p = sub.add_parser("serve", help="serve a student over HTTP with Ray Serve (blocks; Ctrl-C stops)")
    p.add_argument("path", help="a run directory (serves tune/best, else student) or a model folder")
    p.add_argument("overrides", nargs="*", help="serve.* overrides, e.g. serve.max_replicas=4")
    p.add_argument("--config", help="experiment YAML whose serve section to use (default: defaults)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; any other needs RAYKD_API_KEY or "
                   "serve.api_key_file)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p = sub.add_parser("config", help="print the resolved config (with every key described) or its JSON schema")
    p.add_argument("action", choices=["show", "schema"], help="show: resolved YAML with comments; schema: JSON schema")
    p.add_argument("config", nargs="?", help="experiment YAML (show; default: the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.train.lr=3e-4")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p = sub.add_parser("synth", help="write a synthetic interaction log (Parquet)")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--mean-length", type=float, default=30.0)
    p.add_argument("--clusters", type=int, default=20)
    p.add_argument("--popularity-skew", type=float, default=1.0, help="Zipf exponent of item popularity")
    p.add_argument("--markov", type=float, default=0.6, help="chance the next item follows the last one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from raykd import serve
    from raykd.config import load_config

    if any(o.strip().startswith("serve.api_key=") for o in args.overrides):
        raise RaykdError("serve.api_key on the command line is visible to every user of this machine (ps, shell "
                         "history): export RAYKD_API_KEY, or put the key in a file and pass "
                         "serve.api_key_file=PATH (or RAYKD_API_KEY_FILE)")
    extra = [f"serve.host={args.host}"] if args.host else []
    extra += [f"serve.port={args.port}"] if args.port else []
    cfg = load_config(args.config, [*args.overrides, *extra])
    from raykd.runtime import ensure_ray

    check_servable(args.path, cfg.serve)  # a missing, stale or broken model: said before Ray starts
    ensure_ray(cfg.ray)
    serve.run_blocking(args.path, cfg.serve)
    return 0


def check_servable(path: str, settings) -> None:
    """Load what would be served, as a replica will: model, vocabulary, and that they match."""
    from raykd.recommender import Recommender

    try:
        Recommender(path, settings.max_k, settings.max_history)
    except RaykdError:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: the user's to fix
        raise RaykdError(f"{path} cannot be served: its model does not load ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}). Retrain it (`raykd distill "
                         "CONFIG`) or export it again") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raykd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _config(args: argparse.Namespace) -> int:
    from raykd import config_docs
    from raykd.config import load_config

    if args.action == "schema":
        print(config_docs.schema())
        return 0
    print(config_docs.show(load_config(args.config, args.overrides)), end="")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from raykd import synth
    from raykd.config import SyntheticConfig

    try:
        cfg = SyntheticConfig(users=args.users, items=args.items, mean_length=args.mean_length,
                              clusters=args.clusters, popularity_skew=args.popularity_skew,
                              markov=args.markov, seed=args.seed)
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise RaykdError(f"bad synth arguments: {problems}") from None
    if os.path.isdir(args.out):
        raise RaykdError(f"--out {args.out} is a folder; give a file name such as {args.out}/log.parquet")
    info = synth.write(cfg, args.out)
    print(f"synth: wrote {info['interactions']:,} interactions of {info['users']:,} users "
          f"over {info['items']:,} items to {os.path.abspath(info['path'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
