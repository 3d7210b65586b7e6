"""What one training run is: a typed spec, its fingerprint, and the loop config it becomes.

Plain Python (no Ray). A teacher is a spec with item text (or none) and no KD; a student is a
spec with KD settings; its no-KD twin is the same spec without them. `raykd.train.fit` runs a
spec on Ray Train, `raykd.loop.fit_local` runs its loop config in one process (notebooks,
benchmarks), and Tune trials build theirs from a sampled config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from raykd import loop, sequences
from raykd.config import ModelConfig, TrainConfig


@dataclass(frozen=True)
class KD:
    """Distillation settings of a student: soft labels, loss and (optionally) embedding transfer."""

    soft_labels: Path
    alpha: float
    temperature: float = 1.0
    loss: str = "kl"
    transfer_from: tuple[Path, ...] = ()  # teacher folders whose item tables start the student's


@dataclass(frozen=True)
class ItemText:
    """A text teacher's item vectors (embed-items) and how it uses them."""

    vectors: Path
    mode: str = "both"  # fuse | init | both
    init_std: float = 0.02


@dataclass(frozen=True)
class RunSpec:
    """One training run. `name` is its artifact in the run directory (`teacher`, `student`,
    `kd_curve/d8/student_nokd` ...); `upstream` maps the artifacts it is made from to their keys."""

    name: str
    model: ModelConfig
    train: TrainConfig
    seed: int = 0
    kd: KD | None = None
    text: ItemText | None = None
    upstream: dict[str, str] = field(default_factory=dict)

    @property
    def role(self) -> str:
        if self.kd is not None:
            return "student"
        return "teacher" if self.text is not None or self.name.startswith("teacher") else "student_nokd"

    @property
    def fingerprint(self) -> str:
        """What a finished model must have been trained with to be reused (paths left out)."""
        parts = {"model": self.model.model_dump(mode="json"), "train": self.train.model_dump(mode="json"),
                 "seed": self.seed, "upstream": dict(sorted(self.upstream.items())),
                 "kd": None if self.kd is None else {"alpha": self.kd.alpha, "temperature": self.kd.temperature,
                                                     "loss": self.kd.loss, "transfer": bool(self.kd.transfer_from)},
                 "text": None if self.text is None else {"mode": self.text.mode, "init_std": self.text.init_std}}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def loop_config(spec: RunSpec, data_dir: Path, before_epoch: Callable[[int], None] | None = None) -> dict:
    """The dict `raykd.loop` runs (see its docstring). `before_epoch(epoch)` is called on rank 0
    as each epoch starts (tests inject faults through it)."""
    desc = {"family": spec.model.family, "num_items": sequences.num_items(data_dir),
            **spec.model.model_dump(exclude={"family"})}
    t, kd = spec.text, spec.kd
    if t is not None and t.mode in ("fuse", "both"):
        desc["text_dim"] = loop.text_dim(t.vectors, spec.model.dim)
    init_std = t.init_std if t is not None else 0.02
    return {"name": spec.name, "desc": desc, "train": spec.train.model_dump(), "seed": spec.seed,
            "data_dir": str(Path(data_dir).resolve()),
            "alpha": kd.alpha if kd else 0.0, "temperature": kd.temperature if kd else 1.0,
            "kd_loss": kd.loss if kd else "kl",
            "soft_dir": str(Path(kd.soft_labels).resolve()) if kd and kd.alpha > 0 else None,
            "item_counts": loop.item_log_q(data_dir) if spec.train.loss == "sampled" else None,
            "item_text": str(Path(t.vectors).resolve()) if t else None, "text_mode": t.mode if t else "fuse",
            "init_from": [str(Path(f).resolve()) for f in kd.transfer_from] if kd and kd.transfer_from else None,
            "init_std": init_std, "row_negatives": spec.role != "teacher", "before_epoch": before_epoch}
