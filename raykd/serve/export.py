"""export: a run's model as a self-contained bundle (raykd.serve.bundle), with a model card.

    raykd export RUN_DIR --out DIR [--format safetensors|torchscript|onnx] [--with-histories]
                 [--model DIR] [--overwrite] [--ann]

The bundle is written to a temporary folder beside DIR, fsynced, its manifest last, and renamed
into place: DIR is either the whole bundle or absent, never half written, even after a crash.
`--overwrite` replaces a bundle (its manifest says kind "bundle") and nothing else: never a run's
teacher/, student/ or data/. The model folder and the data are each read as one version
(`rundir.copy_snapshot`), so a run publishing a new model meanwhile is never mixed in, and a
model trained on another vocabulary than the run's data holds now is refused. The card (README.md) gives the data, the
model's test metrics beside the teacher's and the no-KD twin's (from the run's report.json), the
distillation settings, the config hash and the versions of raykd, Ray and torch. `--ann` adds an
approximate index of the model's item table (`ann/`, raykd.core.ann) with its recall@10 against exact
in the manifest and the card; `serve.ann: true` serves from it.

This module is imported to build the CLI: torch is imported inside `main` only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from raykd.core import console, rundir
from raykd.core.errors import RaykdError

ROWS = ("popularity", "teacher", "teacher_ensemble", "student", "student_nokd", "tune_best")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (exports its tune winner, else student/) or a model folder")
    p.add_argument("--out", required=True, help="the bundle folder to create")
    p.add_argument("--format", choices=("safetensors", "torchscript", "onnx"), default="safetensors",
                   help="safetensors: weights for raykd; torchscript (model.pt) or onnx (model.onnx): also a graph "
                   "that runs without raykd (onnx needs pip install 'raykd[onnx]')")
    p.add_argument("--with-histories", action="store_true", help="include the users' histories (user_id requests, "
                   "raykd recommend BUNDLE)")
    p.add_argument("--model", help="model folder to export instead of the run's own (e.g. RUN_DIR/teacher)")
    p.add_argument("--overwrite", action="store_true", help="replace the bundle already at --out")
    p.add_argument("--ann", action="store_true", help="also build an approximate index (faiss HNSW) of the model's "
                   "items, with its recall@10 against exact (needs pip install 'raykd[ann]'; serve it with "
                   "serve.ann=true)")


def main(args: argparse.Namespace) -> int:
    """`raykd export`: write the bundle beside --out, then rename it into place."""
    from raykd.serve import bundle
    from raykd.serve.recommender import find_data_dir, resolve_student

    model_dir = resolve_student(args.model or args.run_dir).resolve()
    run_dir = Path(args.run_dir).resolve()
    found = [c for c in (run_dir / "data", run_dir) if (c / rundir.ITEMS).exists()]
    data_dir = found[0] if found else find_data_dir(model_dir)
    out = Path(args.out).resolve()
    _check_out(out, args.overwrite, (model_dir, data_dir, run_dir))
    if args.format == "onnx":
        bundle.require_onnx()
    if getattr(args, "ann", False):
        from raykd.core import ann

        ann.faiss_module()  # a missing library: said before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        source = bundle.copy_sources(tmp, model_dir, data_dir, args.with_histories)
        run_root = data_dir.parent if data_dir.name == "data" else None
        vocab = check_vocab(source.get("vocab_digest"), tmp, model_dir, data_dir, run_root)
        check = bundle.write_graph(tmp, args.format)
        index = bundle.write_index(tmp, data_dir, vocab) if getattr(args, "ann", False) else None
        (tmp / "README.md").write_text(card(model_dir, run_root, tmp, args.format, args.with_histories))
        bundle.write_manifest(tmp, {"format": args.format, "with_histories": args.with_histories,
                                    "source": {"model": str(model_dir), "data": str(data_dir)},
                                    **({"vocab_digest": vocab} if vocab else {}),
                                    **({"ann": index} if index else {}),
                                    "parity": check, "versions": rundir.versions()})
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a bundle is read by servers and jobs
        bundle.sync_files(tmp)
        _place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    graph = f", {bundle.GRAPH_FILES[args.format]} checked against the model" if check.get("checked") else ""
    console.emit(f"export: {model_dir} -> {out} ({args.format}{graph}; {size / 2**20:.1f} MiB"
                 f"{', with user histories' if args.with_histories else ''}); serve it: raykd serve {out}",
                 console.QUIET)
    return 0


def check_vocab(trained_on: str | None, bundle_dir: Path, model_dir: Path, data_dir: Path,
                run_root: Path | None) -> str | None:
    """The model's vocabulary digest, checked against the vocabulary being bundled with it.

    A model trained before the data was prepared anew scores the old items: bundled with the new
    items.parquet it would answer with the wrong items, so it is refused (None: an older model
    with no digest, which only the item count checks).
    """
    import pyarrow.parquet as pq

    if not trained_on:
        console.warn(f"export: {model_dir} records no vocabulary digest (made by an older raykd): it cannot be "
                     "checked against the run's vocabulary beyond the item count")
        return None
    now = rundir.vocab_digest(pq.read_table(bundle_dir / rundir.ITEMS, columns=["raw_id"])["raw_id"].to_pylist())
    if now != trained_on:
        raise RaykdError(f"{model_dir} was trained on item vocabulary {trained_on}, but {data_dir} now holds "
                         f"vocabulary {now} (the data was prepared again): a bundle of it would recommend the wrong "
                         f"items. Retrain it: `{_retrain(model_dir, run_root)}` for this run, then export again")
    return trained_on


def _retrain(model_dir: Path, run_root: Path | None) -> str:
    """The command that remakes a model folder of a run (the whole pipeline when it is not a known one)."""
    rel = model_dir.relative_to(run_root).as_posix() if run_root and run_root in model_dir.parents else ""
    return rundir.MAKES.get(rel) or rundir.MAKES.get(rel.split("/")[0]) or \
        ("raykd distill CONFIG" if rel == rundir.STUDENT_NOKD else "raykd pipeline CONFIG")


def _check_out(out: Path, overwrite: bool, sources: tuple[Path, ...]) -> None:
    if any(out == s or out in s.parents for s in sources):
        raise RaykdError(f"--out {out} holds the model or data being exported: choose a folder outside them")
    if not out.exists():
        return
    if not overwrite:
        raise RaykdError(f"--out {out} already exists: choose a new folder, or pass --overwrite to replace the "
                         "bundle there")
    from raykd.serve.bundle import is_bundle

    if not out.is_dir() or (any(out.iterdir()) and not is_bundle(out)):
        raise RaykdError(f"--out {out} is not a raykd bundle (its manifest.json, if any, does not say kind "
                         "\"bundle\"; a run's teacher/, student/ and data/ are never replaced): refusing to "
                         "replace it; choose a new folder")


def _place(tmp: Path, out: Path) -> None:
    """Rename the finished bundle into place (a bundle already there is replaced, then deleted)."""
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}") if out.exists() else None
    if old:
        os.rename(out, old)
    os.rename(tmp, out)
    rundir.fsync_dir(out.parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the model card


def card(model_dir: Path, run_root: Path | None, bundle_dir: Path, fmt: str, with_histories: bool) -> str:
    """README.md of the bundle: what the model is, how well it does, how it was made, how to use it."""
    desc = rundir.read_json(bundle_dir / rundir.MODEL_JSON)
    report = rundir.read_json(run_root / rundir.REPORT_JSON) if run_root else {}
    name = _report_name(model_dir, run_root)
    lines = [(f"# raykd model bundle: {desc['family']} {desc['dim']}x{desc['layers']} ({desc.get('params', 0):,} "
             f"parameters)\n"),
             (f"Exported from `{model_dir}` ({name or 'a model folder'}); format `{fmt}`"
             f"{', with user histories' if with_histories else ''}.\n")]
    lines += _usage(desc, fmt, with_histories)
    lines += _data(rundir.read_json(bundle_dir / "stats.json"))
    lines += _metrics(report, name)
    lines += _distillation(rundir.read_json(bundle_dir / rundir.METRICS), run_root)
    from raykd.core import ann

    lines += _ann(rundir.read_json(bundle_dir / ann.INDEX_DIR / ann.META_FILE))
    lines += _provenance(desc, report, run_root)
    return "\n".join(lines) + "\n"


def _report_name(model_dir: Path, run_root: Path | None) -> str | None:
    """The model's entry in report.json: student, student_nokd, teacher, tune_best (None: not in it)."""
    if run_root is None or run_root not in model_dir.parents:
        return None
    rel = model_dir.relative_to(run_root).as_posix()
    return rel.replace("/", "_") if rel in ("teacher", "student", "student_nokd", "tune/best") else None


def _usage(desc: dict, fmt: str, with_histories: bool) -> list[str]:
    lines = ["## Use it\n", "With raykd (any folder: the bundle holds everything it needs):\n", "```",
             "raykd serve BUNDLE                      # POST /recommend, POST /recommend/batch"]
    if with_histories:
        lines.append("raykd recommend BUNDLE --k 10 --out recs.parquet")
    lines.append("```\n")
    if fmt == "safetensors":
        lines.append("Weights alone: `raykd.core.models.load_model(BUNDLE)`. Export with `--format torchscript` or "
                     "`onnx` for a graph that runs without raykd.\n")
        return lines
    lines += [("Without raykd: the input is `history`, int64 [batch, max_len] item indices left-padded with 0 "
              f"(max_len {desc['max_len']}; an item's index is its `index` in items.parquet, at least one item per "
              f"row); the output is `scores`, float32 [batch, {desc['num_items'] + 1}] (column 0 is padding). "
              "Mask the items already seen, then take the top k.\n"), "```python"]
    if fmt == "torchscript":
        lines += ["import torch", "model = torch.jit.load('BUNDLE/model.pt')", "scores = model(history)"]
    else:
        lines += ["import onnxruntime", "session = onnxruntime.InferenceSession('BUNDLE/model.onnx')",
                  "scores = session.run(['scores'], {'history': history})[0]"]
    return lines + ["```\n"]


def _data(stats: dict) -> list[str]:
    if not stats:
        return []
    length = stats.get("sequence_length", {})
    dropped = ", ".join(f"{why} {n:,}" for why, n in (stats.get("dropped") or {}).items())
    return ["## Data\n", (f"{stats.get('users', 0):,} users, {stats.get('items', 0):,} items, "
            f"{stats.get('interactions', 0):,} interactions (density {stats.get('density', 0):.4%}); history length "
            f"median {length.get('p50', '?')}, mean {length.get('mean', 0):.1f}, max {length.get('max', '?')}; "
            f"dropped rows: {dropped or 'none'}.\n")]


def _metrics(report: dict, name: str | None) -> list[str]:
    rows = [r for r in ROWS if report.get(r)]
    if not rows:
        return ["## Test metrics\n", "No report.json in the run: run `raykd evaluate CONFIG` before exporting.\n"]
    lines = ["## Test metrics\n", ("Leave-one-out test, full ranking over the catalogue, the history excluded "
             "(the run's report.json). This bundle's model is in bold.\n"),
             "| model | NDCG@10 | HR@10 | MRR@10 | params |", "|---|---|---|---|---|"]
    for row in rows:
        m = report[row]
        label = f"**{row}**" if row == name else row
        lines.append(f"| {label} | {m['ndcg@10']:.4f} | {m['hr@10']:.4f} | {m['mrr@10']:.4f} | "
                     f"{m.get('params', 0):,} |")
    paired = (report.get("student") or {}).get("paired_vs_nokd")
    if paired and paired.get("mean_diff") is not None:
        lines.append(f"\nstudent − no-KD twin, paired over {paired['users']:,} users: NDCG@10 "
                     f"{paired['mean_diff']:+.4f} ± {paired['stderr']:.4f} (s.e.).")
    return lines + [""]


def _distillation(metrics: dict, run_root: Path | None) -> list[str]:
    cfg = _config(run_root)
    distill = cfg.get("distill", {})
    if not metrics and not distill:
        return []
    alpha = metrics.get("alpha", distill.get("alpha"))
    kd = "none (alpha 0: trained on the data alone)" if alpha == 0 else \
        (f"alpha {alpha}, temperature {metrics.get('temperature', distill.get('temperature'))}, loss "
         f"{metrics.get('kd_loss', distill.get('loss'))}, teacher top-K {cfg.get('soft_labels', {}).get('top_k', '?')}, "
         f"embedding transfer {distill.get('transfer', '?')}")
    lines = ["## Distillation\n", f"{kd}."]
    if metrics.get("valid"):
        lines.append(f"Best validation NDCG@10 {metrics['valid'].get('ndcg@10', 0):.4f} at epoch "
                     f"{metrics.get('best_epoch')} of {metrics.get('epochs_run')}.")
    return lines + [""]


def _ann(meta: dict) -> list[str]:
    """The approximate index's section of the card (none without one)."""
    if not meta:
        return []
    recall = meta.get("recall@10")
    measured = (f"recall@10 **{recall:.4f}** against exact scoring, measured at export on "
                f"{meta.get('recall_queries')} users (seed {meta.get('recall_seed')}), their histories excluded"
                if recall is not None else "recall@10 not measured")
    return ["## Approximate index\n", (f"`ann/`: {meta.get('library')} {meta.get('kind')} over {meta.get('items', 0):,} "
            f"items (M {meta.get('links')}, efConstruction {meta.get('ef_construction')}, efSearch "
            f"{meta.get('ef_search')}; built in {meta.get('build_s')} s); {measured}. Serve from it with "
            "`raykd serve BUNDLE serve.ann=true`; exact scoring stays the default.\n")]


def _config(run_root: Path | None) -> dict:
    import yaml

    if run_root is None:
        return {}
    try:
        return yaml.safe_load((run_root / rundir.CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _provenance(desc: dict, report: dict, run_root: Path | None) -> list[str]:
    meta = report.get("meta", {})
    config_hash = meta.get("config_hash") or _config_hash(run_root) or "unknown (no config.yaml)"
    trained = meta.get("versions", {})
    now = rundir.versions()
    lines = ["## Provenance\n", (f"- config hash `{config_hash}`{', run ' + repr(meta['name']) if meta.get('name') else ''}"
             f"{', seed ' + str(meta['seed']) if 'seed' in meta else ''}"),
             f"- model fingerprint `{desc.get('fingerprint')}`",
             f"- exported with raykd {now['raykd']}, Ray {now['ray']}, torch {now['torch']}, Python {now['python']}"]
    if trained:
        lines.append(f"- evaluated with raykd {trained.get('raykd')}, Ray {trained.get('ray')}, torch "
                     f"{trained.get('torch')} on {meta.get('date')}")
    return lines + ["- files, sizes and SHA-256: manifest.json", ""]


def _config_hash(run_root: Path | None) -> str | None:
    if run_root is None or not (run_root / rundir.CONFIG).exists():
        return None
    from raykd.config import load_config, section_hash

    try:
        return section_hash(load_config(run_root / rundir.CONFIG))
    except RaykdError:
        return None
