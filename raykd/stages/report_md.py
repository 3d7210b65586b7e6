"""What `raykd evaluate` writes for people: report.md, its metadata, warnings and plots.

Reads only the report dict that evaluate computed (plus the config for the metadata); writes
`report.md`'s text and the plots next to it: `curves.png` (validation NDCG@10 per epoch of
teacher, student and no-KD twin), `kd_gain.png` (paired student − twin NDCG@10 with its standard
error, per student size) and, with `distill.sizes`, `kd_curve.png` (NDCG@10 against parameters).

A report stores the keys of the models it scored (`models`); `raykd.core.staleness` marks it
STALE when a model is trained again after it.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from raykd.config import Config, section_hash
from raykd.core import rundir

TRAINED = ("teacher", "student", "student_nokd", "tune_best")
# the model artifacts a report shows (tune_best is tune/best/ on disk)


def metadata(cfg: Config) -> dict:
    return {"config_hash": section_hash(cfg), "name": cfg.name, "seed": cfg.seed,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": rundir.versions()}


def warnings(report: dict) -> list[str]:
    """A model whose best validation epoch was its last was probably still improving."""
    out = []
    for name in TRAINED:
        m = report.get(name) or {}
        if m.get("best_epoch") and m.get("best_epoch") == m.get("epochs_run"):
            out.append(f"{name}: its best validation epoch was its last ({m['best_epoch']} of {m['epochs_run']}); "
                       "it may have stopped too early: raise train.epochs")
    return out


def plots(report: dict, run_dir: Path) -> dict:
    """Draw every plot the report has data for; returns {plot: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    curves = {n: report[n]["history"] for n in TRAINED if report.get(n, {}).get("history")}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, history in curves.items():
            ax.plot([h["epoch"] for h in history], [h["ndcg@10"] for h in history], marker=".", label=name)
        ax.set(xlabel="epoch", ylabel="validation NDCG@10", title="training curves")
        ax.legend()
        drawn["curves"] = _save(fig, plt, run_dir / "curves.png")
    gains = _gains(report)
    if gains:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(range(len(gains)), [g[1] for g in gains], yerr=[g[2] for g in gains], capsize=4)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(gains)), [g[0] for g in gains])
        ax.set(ylabel="KD − no-KD test NDCG@10 (± s.e.)", title="distillation gain, paired over users")
        drawn["kd_gain"] = _save(fig, plt, run_dir / "kd_gain.png")
    if report.get("kd_curve"):
        drawn["kd_curve"] = _kd_curve(plt, report["kd_curve"], report.get("teacher"), run_dir / "kd_curve.png")
    return drawn


def _gains(report: dict) -> list[tuple[str, float, float]]:
    out = []
    paired = (report.get("student") or {}).get("paired_vs_nokd")
    if paired and paired.get("mean_diff") is not None:
        out.append((f"student d{report['student'].get('dim', '')}".strip(), paired["mean_diff"], paired["stderr"]))
    for c in report.get("kd_curve") or []:
        out.append((_label(c), c["paired"]["mean_diff"], c["paired"]["stderr"]))
    return out


def _kd_curve(plt, curve: list[dict], teacher: dict | None, path: Path) -> str:
    """NDCG@10 against size (models.count_params) for KD students, no-KD twins and the teacher, one
    line per table family (dense widths, PQ tables) on one size axis (bars: s.e. over users)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for family, marker in (("dense", "o"), ("pq", "s")):
        points = sorted((p for p in curve if p.get("table", "dense") == family), key=lambda p: p["params"])
        for key, label in (("kd", "KD student"), ("nokd", "no-KD twin")):
            if points:
                ax.errorbar([p["params"] for p in points], [p[key]["ndcg@10"] for p in points],
                            yerr=[p[key]["ndcg@10_stderr"] for p in points], marker=marker, capsize=3,
                            linestyle="-" if key == "kd" else "--", label=f"{label} ({family})")
    if teacher:
        ax.plot([teacher["params"]], [teacher["ndcg@10"]], marker="*", markersize=12, linestyle="none", label="teacher")
    for p in curve:
        ax.annotate(_label(p), (p["params"], p["kd"]["ndcg@10"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set(xlabel="size (elements read at inference)", ylabel="test NDCG@10", title="KD gain across student sizes")
    ax.legend(fontsize="small")
    return _save(fig, plt, path)


def _label(point: dict) -> str:
    """A KD curve point's name: its `distill.sizes` entry (`d8`, `pq4`); older reports have only a width."""
    return point.get("size") or f"d{point['dim']}"


def _save(fig, plt, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def markdown(report: dict) -> str:
    d, meta = report["dataset"], report.get("meta", {})
    v = meta.get("versions", {})
    lines = [f"# raykd report: {meta.get('name', '')}\n",
             (f"config hash `{meta.get('config_hash')}`, seed {meta.get('seed')}, {meta.get('date')}; raykd "
             f"{v.get('raykd')}, Ray {v.get('ray')}, torch {v.get('torch')}, Python {v.get('python')}\n"),
             f"{d['users']:,} users, {d['items']:,} items, {d['interactions']:,} interactions; {_protocol(report)}\n",
             ("| model | NDCG@10 | HR@10 | MRR@10 | size: elements (bytes) | size vs teacher | ms / 256 users | kept vs teacher "
             "| top-10 agreement with teacher | best epoch |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("popularity", "teacher", "teacher_ensemble", "student", "student_nokd", "tune_best"):
        m = report.get(name)
        if not m:
            continue
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['hr@10']:.4f} | {m['mrr@10']:.4f} | {_size(m)} | "
                     f"{_pct(m.get('params_vs_teacher'))} | {m.get('latency_ms_256', 0):.2f} | "
                     f"{_pct(m.get('ndcg_kept_vs_teacher'))} | {_pct(m.get('top10_agreement_with_teacher'))} | "
                     f"{m.get('best_epoch') or ''} |")
    lines.append(f"\n{SIZE_NOTE}")
    rare_max = report.get("rare_targets", {}).get("max_train_count", 5)
    p = report.get("student", {}).get("paired_vs_nokd")
    if p:
        lines.append(f"\nstudent − student_nokd NDCG@10 (paired over {p['users']:,} users): "
                     f"{p['mean_diff']:+.4f} ± {p['stderr']:.4f} (standard error)")
    r = report.get("student", {}).get("paired_vs_nokd_rare")
    if r and r["users"]:
        lines.append(f"rare targets (seen <= {rare_max} times in training, {r['users']:,} users): "
                     f"{r['mean_diff']:+.4f} ± {r['stderr']:.4f}")
    if report.get("kd_curve"):
        lines += ["\n## KD curve (kd_curve.png)\n",
                  "| student | size: elements (bytes) | KD NDCG@10 | no-KD NDCG@10 | KD / no-KD | paired diff ± s.e. | rare paired diff ± s.e. |",
                  "|---|---|---|---|---|---|---|"]
        for c in report["kd_curve"]:
            kd, no, pd, pr = c["kd"]["ndcg@10"], c["nokd"]["ndcg@10"], c["paired"], c["rare"]["paired"]
            rare = f"{pr['mean_diff']:+.4f} ± {pr['stderr']:.4f}" if pr["users"] > 1 else "no rare targets"
            lines.append(f"| {_label(c)} | {_size(c)} | {kd:.4f} | {no:.4f} | {kd / no if no else float('nan'):.3f} | "
                         f"{pd['mean_diff']:+.4f} ± {pd['stderr']:.4f} | {rare} |")
    aware = {n: report[n]["repeat_aware"] for n in ("teacher", "student", "student_nokd", "tune_best")
             if report.get(n, {}).get("repeat_aware")}
    if aware:
        lines += ["\nRepeat-aware variant (nothing excluded: the endpoint's answers with `exclude_seen: false`): "
                  + ", ".join(f"{n} NDCG@10 {m['ndcg@10']:.4f}" for n, m in aware.items())]
    if report.get("skipped"):
        lines += ["\n## Not reported\n", *[f"- {n}/: {why}" for n, why in report["skipped"].items()]]
    if report.get("warnings"):
        lines += ["\n## Warnings\n", *[f"- {w}" for w in report["warnings"]]]
    if report.get("plots"):
        lines += ["\n## Plots\n", *[f"- [{name}]({file})" for name, file in report["plots"].items()]]
    return "\n".join(lines) + "\n"


def _protocol(report: dict) -> str:
    p = report.get("protocol", {"exclude_seen": True})
    text = "leave-one-out test, full ranking over the catalogue"
    if not p["exclude_seen"]:
        return text + ", nothing excluded (serve.exclude_seen is false, as the endpoint answers)."
    text += (", the user's history excluded as the endpoint excludes it (serve.exclude_seen): a test target that "
             "repeats a history item counts as a miss")
    return text + (f" ({p['repeat_targets']:,} of them, {p['repeat_share']:.1%})." if p.get("repeat_targets") else ".")


SIZE_NOTE = ("Size: every element of every tensor a model reads at inference (parameters and buffers; a PQ table's "
             "uint8 codes count one element each; a text teacher's item table, folded with its text, counts as one "
             "table), bytes at each tensor's width (float32 4, uint8 1).")


def _size(m: dict) -> str:
    """`elements (bytes)` of a report entry; reports written before bytes were counted show elements only."""
    n, b = m.get("params", 0), m.get("bytes")
    return f"{n:,}" if b is None else f"{n:,} ({_bytes(b)})"


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


# ---------------------------------------------------------------- console summary

def console_summary(report: dict, root: Path) -> str:
    """The few lines evaluate prints: test NDCG@10 per model, the KD gain, warnings, where the report is."""
    lines = [f"evaluate: test metrics ({_protocol(report).split(',')[0]}, full ranking):",
             f"  {'model':<17} {'NDCG@10':>8} {'HR@10':>7} {'params':>9} {'kept vs teacher':>16}"]
    for name in ("popularity", "teacher", "teacher_ensemble", "student", "student_nokd", "tune_best"):
        m = report.get(name)
        if m:
            lines.append(f"  {name:<17} {m['ndcg@10']:>8.4f} {m['hr@10']:>7.4f} {m.get('params', 0):>9,} "
                         f"{_pct(m.get('ndcg_kept_vs_teacher')):>16}")
    p = (report.get("student") or {}).get("paired_vs_nokd")
    if p and p.get("mean_diff") is not None:
        lines.append(f"  student − student_nokd NDCG@10: {p['mean_diff']:+.4f} ± {p['stderr']:.4f} "
                     f"(paired over {p['users']:,} users)")
    lines += [f"  warning: {w}" for w in report.get("warnings") or []]
    plots = ", ".join((report.get("plots") or {}).values())
    lines.append(f"  report: {Path(root) / rundir.REPORT_MD}" + (f" (plots: {plots})" if plots else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- staleness
