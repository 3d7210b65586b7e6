"""Is report.md older than the models it describes? Compare the artifact keys the report stored.

`raykd evaluate` stores the key of every model it scored (`model_keys`); when a model is trained
again without a new report (`raykd distill` or `raykd tune` run alone), `mark_stale` puts a STALE
banner on top of report.md and a `stale` list in report.json. Pure file work, no Ray, no config:
the training layer calls it after publishing a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from raykd.core import rundir

ARTIFACTS = (rundir.TEACHER, rundir.STUDENT, rundir.STUDENT_NOKD, rundir.TUNE_BEST)
STALE = "> **STALE**"


def model_keys(root: Path, names: list[str]) -> dict:
    """The key of each model artifact a report scores (compared later by `changed_since`)."""
    return {name: rundir.key_of(Path(root) / name) for name in names}


def changed_since(root: Path) -> list[str]:
    """What happened to the models since report.json was written, in words ([] when up to date).

    Compares the keys the report stored with the artifacts on disk: a model trained again, a
    model the report never saw (tune/best/ after a first `raykd tune`), a model deleted since.
    """
    report = rundir.read_json(Path(root) / rundir.REPORT_JSON)
    scored = report.get("models")
    if not isinstance(scored, dict):
        return []
    out = []
    for name in sorted(set(scored) | set(ARTIFACTS)):
        now = rundir.key_of(Path(root) / name)
        if name not in scored:
            if now is not None:
                out.append(f"{name}/ was trained after this report and is not in it")
        elif now is None:
            out.append(f"{name}/ was removed after this report")
        elif now != scored[name]:
            out.append(f"{name}/ was trained again after this report")
    return out


def mark_stale(root: Path) -> list[str]:
    """Put a STALE banner on report.md (and `stale` in report.json) if the models changed since."""
    root = Path(root)
    reasons = changed_since(root)
    md_path, json_path = root / rundir.REPORT_MD, root / rundir.REPORT_JSON
    if not reasons or not md_path.exists():
        return reasons
    body = md_path.read_text()
    while body.startswith(STALE):  # replace an earlier banner
        body = body.split("\n\n", 1)[1] if "\n\n" in body else ""
    banner = (f"{STALE}: this report is older than the models it describes: {'; '.join(reasons)}. "
              "Run `raykd evaluate CONFIG` to refresh it.")
    md_path.write_text(f"{banner}\n\n{body}")
    report = rundir.read_json(json_path)
    if report:
        report["stale"] = reasons
        json_path.write_text(json.dumps(report, indent=2))
    return reasons

