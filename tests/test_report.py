"""report.md, its warnings and plots, from a hand-made report dict (no Ray, no training)."""

from __future__ import annotations

from raykd.stages import report_md


def fake_report() -> dict:
    def model(ndcg, best, run, **extra):
        return {"ndcg@10": ndcg, "hr@10": 2 * ndcg, "mrr@10": ndcg / 2, "params": 1000, "latency_ms_256": 1.0,
                "best_epoch": best, "epochs_run": run, "dim": 8,
                "history": [{"epoch": e, "ndcg@10": ndcg * e / run} for e in range(1, run + 1)], **extra}

    return {"dataset": {"users": 10, "items": 20, "interactions": 100},
            "meta": {"name": "x", "config_hash": "abc", "seed": 0, "date": "today", "versions": {}},
            "popularity": {"ndcg@10": 0.01, "hr@10": 0.02, "mrr@10": 0.005},
            "teacher": model(0.3, 4, 10),
            "student": model(0.2, 10, 10, paired_vs_nokd={"mean_diff": 0.05, "stderr": 0.01, "users": 10},
                             params_vs_teacher=0.125, ndcg_kept_vs_teacher=0.2 / 0.3),
            "student_nokd": model(0.15, 9, 10)}


def test_warning_when_the_best_epoch_is_the_last():
    (warning,) = report_md.warnings(fake_report())
    assert warning.startswith("student: its best validation epoch was its last (10 of 10)")


def test_markdown_has_metadata_ratios_warnings_and_plot_links(tmp_path):
    report = fake_report()
    report["warnings"] = report_md.warnings(report)
    report["plots"] = report_md.plots(report, tmp_path)
    assert report["plots"] == {"curves": "curves.png", "kd_gain": "kd_gain.png"}
    assert (tmp_path / "curves.png").exists() and (tmp_path / "kd_gain.png").exists()
    md = report_md.markdown(report)
    assert "config hash `abc`" in md
    assert "| student | 0.2000 | 0.4000 | 0.1000 | 1,000 | 12.5% | 1.00 | 66.7% |  | 10 |" in md
    assert "## Warnings" in md and "- [kd_gain](kd_gain.png)" in md
