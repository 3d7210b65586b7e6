"""What one training run is: a typed spec and its fingerprint.

Plain Python (no Ray). A teacher is a spec with item text (or none) and no KD; a student is a
spec with KD settings; its no-KD twin is the same spec without them. The spec travels as it is
to whatever trains it (raykd.training.loop: a Ray Train worker, a Ray task, a Tune trial or this process),
which builds the model and the loss from it once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from raykd.config import ModelConfig, TrainConfig


@dataclass(frozen=True)
class KD:
    """Distillation settings of a student: soft labels, loss and (optionally) embedding transfer.
    The fields are the `distill.*` keys of the same names (raykd.config.DistillConfig)."""

    soft_labels: Path
    alpha: float
    temperature: float
    loss: str  # kl | kl_full | rank (raykd.core.losses.KINDS)
    transfer_from: tuple[Path, ...]  # teacher folders whose item tables start the student's (distill.transfer)
    init_std: float  # per-column std of a transferred item table (raykd.config.INIT_STD)


@dataclass(frozen=True)
class ItemText:
    """A text teacher's item vectors (embed-items) and how it uses them (`teacher.text_mode`,
    `teacher.init_std`)."""

    vectors: Path
    mode: str  # fuse | init | both
    init_std: float


@dataclass(frozen=True)
class RunSpec:
    """One training run. `name` is its artifact in the run directory (`teacher`, `student`,
    `kd_curve/d8/student_nokd` ...); `upstream` maps the artifacts it is made from to their keys.
    `before_epoch(epoch)`, when set, runs as each epoch starts (rank 0 of a DDP run): tests inject
    faults with it; it is not part of what the run is (`fingerprint`)."""

    name: str
    model: ModelConfig
    train: TrainConfig
    seed: int
    kd: KD | None = None
    text: ItemText | None = None
    upstream: dict[str, str] = field(default_factory=dict)
    before_epoch: Callable[[int], None] | None = field(default=None, compare=False, repr=False)

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
