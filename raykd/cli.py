"""The `raykd` command: one subcommand per stage, each `raykd STAGE CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
import traceback
from pathlib import Path

from raykd.core import console, rundir
from raykd.core.errors import RaykdError

# commands on a finished run: module with add_arguments(parser) and main(args), help
TOOLS = {
    "recommend": ("raykd.serve.recommend", "top-k for every user (or a list) as Parquet, on a Ray Data actor pool"),
    "export": ("raykd.serve.export", "a self-contained model bundle (safetensors, TorchScript or ONNX)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.command = args.command.replace("-", "_") if args.command not in TOOLS else args.command
    set_output_level(args)
    try:
        if args.command == "synth":
            return _synth(args)
        if args.command == "init":
            return _init(args)
        from raykd.config import load_config
        from raykd.config.loading import refuse_secrets

        refuse_secrets(getattr(args, "overrides", None) or [])  # serve.api_key in any spelling

        if args.command == "serve":
            return _serve(args)
        if args.command == "config":
            return _config(args)
        if args.command in TOOLS:  # commands on a finished run: RUN_DIR and flags, not a config
            return importlib.import_module(TOOLS[args.command][0]).main(args) or 0

        cfg = load_config(args.config, args.overrides)
        start = time.perf_counter()
        if args.command == "pipeline":
            from raykd.stages import pipeline

            pipeline.run(cfg)
        else:
            from raykd import stages

            stages.run(cfg, [args.command])
            console.emit(f"raykd {args.command}: done in {console.duration(time.perf_counter() - start)}; its lines "
                         f"are in {os.path.join(cfg.output_dir, 'logs', 'raykd.log')}", console.QUIET)
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
    output_flags(parser, default=False)  # `raykd -q pipeline ...`
    common = argparse.ArgumentParser(add_help=False)  # flags every command takes: `raykd pipeline ... -q`
    common.add_argument("--debug", action="store_true", help="show Python tracebacks")
    output_flags(common, default=argparse.SUPPRESS)  # SUPPRESS: never overwrite a flag given before the command
    sub = parser.add_subparsers(dest="command")
    from raykd.stages import STAGES

    commands = [(s.name, s.help) for s in STAGES] + [("pipeline", "every stage in order, reusing finished ones")]
    for name, help_text in commands:
        dashed = [name.replace("_", "-")] if "_" in name else []  # `raykd soft-labels` works too
        p = sub.add_parser(name, aliases=dashed, help=help_text, description=help_text, parents=[common])
        p.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=x.csv teacher.train.lr=3e-4")
    for name, (module, help_text) in TOOLS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        importlib.import_module(module).add_arguments(p)
    p = sub.add_parser("serve", help="serve a student over HTTP with Ray Serve (blocks; Ctrl-C stops)", parents=[common])
    p.add_argument("path", help="a run directory (serves tune/best, else student) or a model folder")
    p.add_argument("overrides", nargs="*", help="serve.* overrides, e.g. serve.max_replicas=4")
    p.add_argument("--config", help="experiment YAML whose serve section to use (default: defaults)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; any other needs RAYKD_API_KEY or "
                   "serve.api_key_file)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p = sub.add_parser("config", help="print the resolved config (with every key described) or its JSON schema",
                       parents=[common])
    p.add_argument("action", choices=["show", "schema"], help="show: resolved YAML with comments; schema: JSON schema")
    p.add_argument("config", nargs="?", help="experiment YAML (show; default: the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.train.lr=3e-4")
    p = sub.add_parser("init", help="start an experiment: copy a bundled example config to NAME.yaml",
                       description="Write NAME.yaml from a bundled example config (name and output_dir set to "
                       "NAME), ready for `raykd pipeline NAME.yaml`.", parents=[common])
    p.add_argument("name", nargs="?", help="experiment name, or a path ending in .yaml")
    p.add_argument("--example", default="quickstart", help="the example to start from (default quickstart; "
                   "--list shows them)")
    p.add_argument("--list", action="store_true", help="list the bundled examples and exit")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p = sub.add_parser("synth", help="write a synthetic interaction log (Parquet)", parents=[common])
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--mean-length", type=float, default=30.0)
    p.add_argument("--clusters", type=int, default=20)
    p.add_argument("--popularity-skew", type=float, default=1.0, help="Zipf exponent of item popularity")
    p.add_argument("--markov", type=float, default=0.6, help="chance the next item follows the last one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .parquet file")
    return parser


def output_flags(target: argparse.ArgumentParser, default=False) -> None:
    """-q/-v on `target`: the top-level parser holds the defaults, subcommands only set them."""
    group = target.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="only warnings, errors and the result (a run's lines stay in <run>/logs/raykd.log)")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="every epoch, the full report, and Ray's own logs on the console")


def set_output_level(args: argparse.Namespace) -> None:
    console.set_level(console.QUIET if args.quiet else console.VERBOSE if args.verbose else console.NORMAL)


def _serve(args: argparse.Namespace) -> int:
    from raykd.config import load_config
    from raykd.serve import app as serve

    extra = [f"serve.host={args.host}"] if args.host else []
    extra += [f"serve.port={args.port}"] if args.port else []
    cfg = load_config(args.config, [*args.overrides, *extra])
    from raykd.cluster.output import run_logs
    from raykd.cluster.runtime import ensure_ray
    from raykd.core.rundir import logs_of

    check_servable(args.path, cfg.serve)  # a missing, stale or broken model: said before Ray starts
    _warn_if_the_report_is_stale(Path(args.path))
    import ray

    started = not ray.is_initialized()
    with run_logs(logs_of(Path(args.path), "serve")):  # Serve's start-up lines to the logs, its URL to the console
        try:
            ensure_ray(cfg.ray, quiet=console.level() < console.VERBOSE)
            serve.run_blocking(args.path, cfg.serve)
        finally:
            if started:
                ray.shutdown()  # while Ray's shutdown lines still go to the logs
    return 0


def _warn_if_the_report_is_stale(run_dir: Path) -> None:
    """A run whose models changed after its report: say so before serving one of them."""
    from raykd.core import staleness

    changed = staleness.changed_since(run_dir) if (run_dir / rundir.REPORT_JSON).exists() else []
    if changed:
        console.warn(f"{run_dir / 'report.md'} is older than the models it describes ({'; '.join(changed)}): "
                     "`raykd evaluate CONFIG` refreshes it")


def check_servable(path: str, settings) -> None:
    """Load what would be served, as a replica will: model, vocabulary, and that they match."""
    from raykd.serve.recommender import Recommender

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
    from raykd.config import docs as config_docs
    from raykd.config import load_config

    if args.action == "schema":
        print(config_docs.schema())
        return 0
    print(config_docs.show(load_config(args.config, args.overrides)), end="")
    return 0


def bundled_examples() -> dict[str, str]:
    """The example experiment configs shipped in the package (raykd/configs/): name -> YAML text.

    serve.yaml ships beside them but is a Ray Serve config (`serve run`), not an experiment.
    """
    from importlib import resources

    folder = resources.files("raykd") / "configs"
    return {f.name[:-5]: f.read_text() for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml") and f.name != "serve.yaml"}


def _init(args: argparse.Namespace) -> int:
    """`raykd init NAME`: NAME.yaml from a bundled example, with its name and output_dir set to NAME."""
    examples = bundled_examples()
    if args.list:
        for name, text in examples.items():
            about = [line[2:] for line in text.splitlines()[1:3] if line.startswith("# ")]
            print(f"{name:<11} {about[0] if about else ''}")
        return 0
    if not args.name:
        raise RaykdError("give the experiment a name: raykd init NAME (writes NAME.yaml; --list shows the examples)")
    if args.example not in examples:
        raise RaykdError(f"no bundled example {args.example!r}; there are: {', '.join(examples)}")
    path = Path(args.name if args.name.endswith((".yaml", ".yml")) else f"{args.name}.yaml")
    name = path.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise RaykdError(f"experiment name {name!r}: use letters, digits, '_', '-' and '.' (it names runs/{name})")
    if path.exists() and not args.force:
        raise RaykdError(f"{path} already exists: choose another name, or pass --force to replace it")
    text = examples[args.example].replace(f"configs/{args.example}.yaml", str(path))
    text = re.sub(r"(?m)^name: .*$", f"name: {name}", text, count=1)
    text = re.sub(r"(?m)^output_dir: .*$", f"output_dir: runs/{name}", text, count=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path} from the {args.example} example (name {name}, output_dir runs/{name})\n"
          f"  every key with its description: raykd config show {path}\n"
          f"  run it: raykd pipeline {path}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from raykd.config import SyntheticConfig
    from raykd.data import synth

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
