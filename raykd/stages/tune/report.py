"""tune outputs: the trials table, the Pareto front, the winner and why, best.yaml, best/, plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raykd.cluster import train
from raykd.config import Config
from raykd.core import rundir
from raykd.core.errors import RaykdError
from raykd.stages.tune.space import apply_values, config_value
from raykd.training.spec import RunSpec

METRIC = "best_val_ndcg@10"  # the trial's best epoch so far: what its exported model scores
SIZE_METRICS = {"params": "params", "latency": "latency_ms"}
ALWAYS_SHOWN = ("distill.temperature", "distill.alpha", "distill.model.dim", "distill.model.layers",
                "distill.train.lr")

def pareto_front(ndcg: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point beats on both (higher NDCG, smaller size)."""
    ndcg, size = np.asarray(ndcg, dtype=float), np.asarray(size, dtype=float)
    order = np.lexsort((-ndcg, size))  # by size, then best NDCG first among equal sizes
    front = np.zeros(len(ndcg), dtype=bool)
    best = -np.inf
    for i in order:
        if ndcg[i] > best:
            front[i] = True
            best = ndcg[i]
    return front


def pick_winner(table: pd.DataFrame, objective: str, size_col: str = "params",
                max_quality_drop: float = 0.02) -> tuple[Any, str]:
    """The index of the winning row of a trials table and a sentence saying why it won.

    Rows need `val_ndcg@10` and `size_col`; rows with a missing NDCG (failed trials) never win.
    - ndcg: the highest val NDCG@10 (ties: the smaller student).
    - pareto: among rows with val NDCG@10 >= (1 - max_quality_drop) * best, the smallest
      `size_col` (ties: the higher NDCG). The winner is always on the Pareto front.
    """
    ok = table[table["val_ndcg@10"].notna()]
    if ok.empty:
        raise RaykdError("no trial produced a validation NDCG: every trial failed")
    best_idx = ok.sort_values(["val_ndcg@10", size_col], ascending=[False, True]).index[0]
    best = float(ok.at[best_idx, "val_ndcg@10"])
    unit = "ms" if size_col.startswith("latency") else "params"

    def size_text(i) -> str:
        v = ok.at[i, size_col]
        return f"{v:.2f} ms" if unit == "ms" else f"{int(v):,} params"

    if objective == "ndcg":
        rest = ok.drop(index=best_idx)["val_ndcg@10"]
        runner_up = f"; next best {rest.max():.4f}" if len(rest) else ""
        return best_idx, (f"highest val NDCG@10 of {len(ok)} trial(s): {best:.4f} ({size_text(best_idx)})"
                          f"{runner_up}")
    floor = (1.0 - max_quality_drop) * best
    close = ok[ok["val_ndcg@10"] >= floor - 1e-12]
    win = close.sort_values([size_col, "val_ndcg@10"], ascending=[True, False]).index[0]
    ndcg = float(ok.at[win, "val_ndcg@10"])
    if win == best_idx:
        return win, (f"best val NDCG@10 ({best:.4f}) and no smaller student within {max_quality_drop:.0%} of it "
                     f"({size_text(win)}); {len(close)} of {len(ok)} trial(s) were within {max_quality_drop:.0%}")
    return win, (f"smallest student ({size_text(win)}) within {max_quality_drop:.0%} of the best val NDCG@10: "
                 f"{ndcg:.4f} vs {best:.4f} ({(ndcg / best - 1):+.1%}) of the best trial with "
                 f"{size_text(best_idx)}; {len(close)} of {len(ok)} trial(s) were within {max_quality_drop:.0%}")



def experiment_trials(exp_dir: Path) -> list:
    from ray.tune import ExperimentAnalysis

    try:
        return ExperimentAnalysis(str(exp_dir)).trials
    except (ValueError, FileNotFoundError, OSError):
        return []


def trials_table(exp_dir: Path, cfg: Config) -> pd.DataFrame:
    """One row per trial, read from the experiment state and each trial's last Train checkpoint."""
    rows = []
    for t in experiment_trials(exp_dir):
        r = t.last_result or {}
        values = apply_values(cfg, t.config) if t.config else cfg
        row = {"trial_id": t.trial_id}
        for key in dict.fromkeys([*cfg.tune.space, *ALWAYS_SHOWN]):
            row[key] = config_value(values, key)
        # the configured student (the search's first point when the space contains it)
        row["configured"] = all(config_value(values, k) == config_value(cfg, k) for k in cfg.tune.space)
        ckpt = _checkpoint(r.get("checkpoint_path"), t, exp_dir)
        state = rundir.read_json(Path(ckpt) / "state.json") if ckpt else {}
        best = state.get("best", {})
        if t.status == "ERROR" or not state:
            status = "error"
        else:
            status = "finished" if r.get("finished") else "stopped"
        loop_s = sum(h["seconds"] for h in state.get("history", []))
        row.update({
            "state": status,
            "val_ndcg@10": best.get("metrics", {}).get("ndcg@10") if state else None,
            "best_epoch": best.get("epoch", -1) + 1 if state else None,
            "epochs_run": state.get("epoch", -1) + 1 if state else None,
            "params": r.get("params"), "latency_ms": r.get("latency_ms"),
            "trial_s": r.get("trial_s", r.get("time_total_s")), "loop_s": loop_s if state else None,
            "checkpoint_path": ckpt,
        })
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["overhead_s"] = table["trial_s"] - table["loop_s"]
    return table


def _checkpoint(reported: str | None, trial, exp_dir: Path) -> str | None:
    """The trial's last checkpoint: the reported path (a Train run's), else the latest one Tune
    holds for it (an in-process trial's), else the newest one on disk."""
    if reported and (Path(reported) / "state.json").exists():
        return reported
    held = getattr(trial, "checkpoint", None)
    if held is not None and (Path(held.path) / "state.json").exists():
        return held.path
    found = trial_checkpoints(exp_dir.parent, trial.trial_id)
    return str(found[-1]) if found else None


def trial_checkpoints(out: Path, trial_id: str) -> list[Path]:
    """A trial's checkpoints with a state, oldest first: its Train run's (`out/train/trial_<id>/`)
    or, for an in-process trial, Tune's (`out/search/trial_<id>/`)."""
    for run in (out / "train" / f"trial_{trial_id}", out / "search" / f"trial_{trial_id}"):
        found = [p for p in sorted(run.glob("checkpoint_*"), key=lambda p: p.name) if (p / "state.json").exists()]
        if found:
            return found
    return []


def analyse(cfg: Config, out: Path, key: str, spec: RunSpec) -> dict:
    """Trials table, Pareto front, winner (exported to tune/best), best.yaml, plots, summary."""
    tc = cfg.tune
    table = trials_table(out / "search", cfg)
    if table.empty or table["val_ndcg@10"].notna().sum() == 0:
        raise RaykdError(f"tune: no trial finished an epoch; see the trial logs under {out / 'search'}")
    size_col = SIZE_METRICS[tc.size_metric]
    ok = table["val_ndcg@10"].notna()
    table["pareto"] = False
    table.loc[ok, "pareto"] = pareto_front(table.loc[ok, "val_ndcg@10"], table.loc[ok, size_col])
    win, why = pick_winner(table, tc.objective, size_col, tc.max_quality_drop)
    table["winner"] = table.index == win
    teacher = rundir.read_json(out.parent / "teacher" / rundir.MODEL_JSON).get("params")
    if teacher:
        table["params_vs_teacher"] = table["params"] / teacher
    table.to_parquet(out / "trials.parquet", index=False)
    table.to_csv(out / "trials.csv", index=False)
    row = table.loc[win]
    values = {k: _plain(row[k]) for k in tc.space}
    winner = {"trial_id": row["trial_id"], "values": values, "val_ndcg@10": float(row["val_ndcg@10"]),
              "params": int(row["params"]), "latency_ms": float(row["latency_ms"]), "why": why,
              "params_vs_teacher": float(row["params"] / teacher) if teacher else None}
    best_cfg = apply_values(cfg, values)
    d = best_cfg.distill
    # the winner's own settings (the searched values applied), published in one rename
    spec = dataclasses.replace(spec, model=d.model, train=d.train, kd=dataclasses.replace(
        spec.kd, alpha=d.alpha, temperature=d.temperature, loss=d.loss))
    train.export(Path(row["checkpoint_path"]), out / "best", spec, out.parent / "data",
                 {"name": "tune/best", "trial_id": row["trial_id"], "values": values, "alpha": d.alpha,
                  "temperature": d.temperature, "kd_loss": d.loss if d.alpha > 0 else None,
                  "fingerprint": spec.fingerprint, "search_key": key})
    _write_best_yaml(out / "best.yaml", values, winner)
    plots = _plots(table, out, size_col, tc.objective)
    counts = table["state"].value_counts().to_dict()
    search = rundir.read_json(out / "search.json")
    summary = {"key": key, "max_quality_drop": tc.max_quality_drop, "objective": tc.objective,
               "size_metric": tc.size_metric, "trials": len(table), "states": counts,
               "search_seconds": search.get("seconds"), "loop_s": float(table["loop_s"].fillna(0).sum()),
               "resources": {k: search.get(k) for k in ("max_concurrent_trials", "workers_per_trial", "cpus_per_worker",
                                                     "in_process")},
               "winner": winner,
               "pareto_front": table.loc[table["pareto"], ["trial_id", "val_ndcg@10", "params", "latency_ms"]]
               .to_dict("records"), "plots": plots}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_plain))
    _print_result(table, winner, teacher, out, size_col)
    return summary


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _write_best_yaml(path: Path, values: dict, winner: dict) -> None:
    nested: dict = {}
    for key, value in values.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    overrides = " ".join(f"{k}={v}" for k, v in values.items())
    header = (f"# raykd tune winner: trial {winner['trial_id']}, val NDCG@10 {winner['val_ndcg@10']:.4f}, "
              f"{winner['params']:,} params\n# why: {winner['why']}\n"
              f"# use: raykd distill CONFIG {overrides}\n")
    path.write_text(header + yaml.safe_dump(nested, sort_keys=False))


def _print_result(table: pd.DataFrame, winner: dict, teacher: int | None, out: Path, size_col: str) -> None:
    cols = ["trial_id", "state", *ALWAYS_SHOWN, "val_ndcg@10", "params", "latency_ms", "pareto"]
    shown = table[[c for c in dict.fromkeys(cols) if c in table]].sort_values("val_ndcg@10", ascending=False)
    shown = shown.rename(columns=lambda c: c.rsplit(".", 1)[-1])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    share = f", {winner['params'] / teacher:.1%} of the teacher's {teacher:,}" if teacher else ""
    print(f"tune: winner {winner['trial_id']} ({', '.join(f'{k}={fmt(v)}' for k, v in winner['values'].items())})"
          f": val NDCG@10 {winner['val_ndcg@10']:.4f}, {winner['params']:,} params{share}\n"
          f"tune: why: {winner['why']}\n"
          f"tune: exported to {out / 'best'}; config values in {out / 'best.yaml'}; "
          "test metrics: `raykd evaluate CONFIG` (report.json, tune_best)", flush=True)


def _plots(table: pd.DataFrame, out: Path, size_col: str, objective: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["val_ndcg@10"].notna()]
    colors = {"finished": "tab:blue", "stopped": "tab:gray"}
    written = []

    def scatter(ax, x: str) -> None:
        for state, part in ok.groupby("state"):
            ax.scatter(part[x], part["val_ndcg@10"], c=colors.get(state, "tab:red"), label=state, alpha=0.8)
        w = ok[ok["winner"]]
        ax.scatter(w[x], w["val_ndcg@10"], marker="*", s=250, c="tab:orange", edgecolors="k", label="winner",
                   zorder=3)
        ax.set_ylabel("validation NDCG@10")
        ax.grid(alpha=0.3)

    for x, name, label, log in ((size_col, f"ndcg_vs_{size_col}.png",
                                 "parameters" if size_col == "params" else "ms per 256 users (1 thread)", True),
                                ("distill.temperature", "ndcg_vs_temperature.png", "temperature T", True),
                                ("distill.alpha", "ndcg_vs_alpha.png", "alpha (weight of the KD term)", False)):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        scatter(ax, x)
        if x == size_col:
            front = ok[ok["pareto"]].sort_values(x)
            ax.step(front[x], front["val_ndcg@10"], where="post", c="tab:green", lw=1.5, label="Pareto front")
            ax.scatter(front[x], front["val_ndcg@10"], facecolors="none", edgecolors="tab:green", s=120, lw=1.5)
        if log and (ok[x] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_title(f"{len(ok)} trials ({objective})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)

