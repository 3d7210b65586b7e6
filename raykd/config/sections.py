"""The config sections: one pydantic model per stage, every key described, defaults defined here only.

Unknown keys are errors (`extra="forbid"`); `raykd.config.loading` reads the YAML and the overrides.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from raykd.config.auth import API_KEY_ENV, API_KEY_FILE_ENV, is_loopback

SAMPLED_ABOVE_ITEMS = 100_000  # `train.loss: auto` uses the sampled softmax above this many items
INIT_STD = 0.02  # per-column std of an item table initialised from text or a teacher (distill.transfer)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(Section):
    """Seeded synthetic logs: popularity skew, taste clusters and Markov item-to-item structure."""

    users: int = Field(2000, ge=1, description="number of users")
    items: int = Field(1000, ge=2, description="catalogue size")
    mean_length: float = Field(30.0, gt=0, description="mean interactions per user")
    clusters: int = Field(20, ge=1, description="user taste clusters")
    popularity_skew: float = Field(1.0, ge=0, description="Zipf exponent of item popularity")
    markov: float = Field(0.6, ge=0, le=1, description="chance the next item follows the last one")
    seed: int = Field(0, description="generator seed (the same seed gives the same log)")


class ItemTextConfig(Section):
    """A table of item text (csv, parquet or jsonl by extension): one id column, text columns."""

    path: str = Field(description="the item text table (.csv/.tsv, .parquet or .jsonl)")
    id_col: str = Field("item_id", description="column holding the item ids of the interaction log")
    text_cols: list[str] = Field(default_factory=lambda: ["title"], min_length=1,
                                 description="columns joined with ' | ' into each item's text")
    delimiter: str = Field(",", description="csv only; one character, e.g. '\\t' for a tab")

    @field_validator("text_cols", mode="before")
    @classmethod
    def _one_column(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # `text_cols=title` on the command line

    @field_validator("delimiter", mode="before")
    @classmethod
    def _tab(cls, v: Any) -> Any:
        v = {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(v, v) if isinstance(v, str) else v
        if isinstance(v, str) and len(v) != 1:
            raise ValueError("must be one character (write a tab as '\\t')")
        return v


class DataConfig(Section):
    """Where the interaction log is and how to read and clean it (the prepare stage)."""

    format: Literal["movielens", "csv", "parquet", "jsonl", "synthetic"] = Field(
        "synthetic", description="input format: movielens (u.data / ratings.dat / ratings.csv), csv, parquet, "
        "jsonl, or synthetic (generated, no file)")
    path: str | None = Field(None, description="file or folder (not used by synthetic)")
    user_col: str = Field("user_id", description="column of user ids (0-based index for a headerless csv)")
    item_col: str = Field("item_id", description="column of item ids (0-based index for a headerless csv)")
    time_col: str | None = Field(None, description="no time column: file order is time order")
    time_format: str | None = Field(None, description="how the time column writes dates, one strptime format for "
                                    "the whole column (e.g. '%d/%m/%Y %H:%M') or 'ISO8601'; default: inferred "
                                    "when only one format reads every date the same way, else an error")
    rating_col: str | None = Field(None, description="column of ratings, for data.min_rating")
    min_rating: float | None = Field(None, description="keep rows with rating >= this")
    delimiter: str = Field(",", description="csv only; any single character, e.g. '\\t'")
    header: bool = Field(True, description="csv only; without a header, *_col are 0-based indices")
    min_user_interactions: int = Field(5, ge=3, description="k-core: users need at least this")
    min_item_interactions: int = Field(5, ge=1, description="k-core: items need at least this")
    num_shards: int | None = Field(None, ge=1, description="output shards; default ~12.5k users each (soft labels run up to one actor per shard)")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    item_text: ItemTextConfig | None = Field(None, description="item text table for embed-items")

    @field_validator("user_col", "item_col", "time_col", "rating_col", mode="before")
    @classmethod
    def _column_index(cls, v: Any) -> Any:
        # `data.user_col=0` (a headerless csv) arrives from YAML as an int
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("delimiter", mode="before")
    @classmethod
    def _one_character(cls, v: Any) -> Any:
        v = {"\\t": "\t", "tab": "\t", "TAB": "\t", "space": " "}.get(v, v) if isinstance(v, str) else v
        if isinstance(v, str) and (len(v) != 1 or v in '\r\n"'):
            raise ValueError("must be one character other than a quote or newline (write a tab as '\\t')")
        return v

    @model_validator(mode="after")
    def _rating_filter_needs_ratings(self) -> DataConfig:
        if self.min_rating is not None and self.format == "synthetic":
            raise ValueError("data.min_rating is set but synthetic logs have no ratings; remove it")
        if self.min_rating is not None and self.rating_col is None and self.format != "movielens":
            raise ValueError("data.min_rating needs data.rating_col: the column that holds the ratings")
        if self.time_format is not None and (self.time_col is None or self.format in ("synthetic", "movielens")):
            raise ValueError("data.time_format is set but there is no date column to read with it (data.time_col "
                             "unset, or a format whose time is epoch seconds); remove it")
        if self.time_format is not None and "%" not in self.time_format and self.time_format != "ISO8601":
            raise ValueError("data.time_format must be a strptime format such as '%d/%m/%Y' or 'ISO8601'")
        return self


class ItemTableConfig(Section):
    """A compressed item table: product quantisation (RecJPQ). Each item stores `codes` uint8 codes;
    code c picks a row of sub-space c's `codebook`-row codebook, and the item's vector is the
    concatenation of the picked rows (raykd.core.item_tables)."""

    kind: Literal["pq"] = Field("pq", description="pq: product-quantised (the only compressed kind so far)")
    codes: int = Field(4, ge=1, description="codes per item = sub-spaces of the width (at most dim; the width "
                       "is split into near-equal column runs)")
    codebook: int = Field(256, ge=2, le=256, description="rows per sub-space codebook (codes are uint8)")
    assign: Literal["svd", "text", "teacher"] = Field(
        "svd", description="where the fixed codes come from: svd (RecJPQ: truncated SVD of the train "
        "interactions, quantile bins), text (k-means per sub-space over the PCA-whitened item text "
        "vectors of embed-items), teacher (k-means over the teacher's item table; needs distill.transfer; "
        "the no-KD twin then gets svd codes, so no teacher reaches the baseline)")


class ModelConfig(Section):
    """Size of a sequential recommender (teacher or student)."""

    family: Literal["sasrec", "gru"] = Field("sasrec", description="sasrec (self-attention) or gru (GRU4Rec)")
    dim: int = Field(64, ge=2, description="embedding width (the item table is num_items x dim)")
    layers: int = Field(2, ge=1, description="transformer blocks (sasrec) or GRU layers (gru)")
    heads: int = Field(2, ge=1, description="attention heads (sasrec; must divide dim)")
    max_len: int = Field(50, ge=2, description="histories keep their last max_len items")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout on embeddings and blocks")
    item_table: ItemTableConfig | None = Field(
        None, description="null: a dense num_items x dim table; {kind: pq, codes, codebook, assign}: a "
        "product-quantised one (num_items x codes bytes + codebook x dim floats)")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> ModelConfig:
        if self.family == "sasrec" and self.dim % self.heads:
            raise ValueError(f"SASRec needs dim divisible by heads: dim {self.dim}, heads {self.heads}")
        if self.item_table is not None and self.item_table.codes > self.dim:
            raise ValueError(f"item_table.codes ({self.item_table.codes}) cannot exceed dim ({self.dim}): each code "
                             "covers at least one column")
        return self


class TrainConfig(Section):
    """One training loop for teacher and students (Ray Train's TorchTrainer, or one Ray task)."""

    epochs: int = Field(30, ge=1, description="at most this many epochs (early stopping may end sooner)")
    batch_size: int = Field(128, ge=1, description="training windows per step: in all (split across workers) "
                            "with batch_scaling fixed, per worker with per_worker")
    batch_scaling: Literal["fixed", "per_worker"] = Field(
        "fixed", description="fixed: batch_size is the global batch, split across the workers (steps per epoch and "
        "the learning rate do not depend on num_workers); per_worker: every worker takes batch_size windows a step, "
        "so the global batch is batch_size x num_workers, N workers take N times fewer steps each, and the learning "
        "rate is lr x sqrt(num_workers) (square-root scaling for Adam)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay (not on a sparse item table)")
    sparse_table: bool = Field(True, description="with a sampled softmax, a dense item table without text fusion "
                               "and CPU workers (gloo): a step touches only the table rows it uses (sparse "
                               "gradients, SparseAdam on the table, Adam on the rest; DDP all-reduces the rows); "
                               "the table then gets no weight decay. false: dense Adam on every row every step")
    patience: int = Field(5, ge=1, description="early stop after this many epochs without gain")
    min_epochs: int = Field(0, ge=0, description="never stop early before this many epochs (students may "
                            "plateau before they climb)")
    loss: Literal["auto", "full", "sampled"] = Field(
        "auto", description="full: softmax over the whole catalogue ([positions, items] logits a step); sampled: "
        f"log-Q sampled softmax (no step cost grows with the catalogue); auto: sampled above {SAMPLED_ABOVE_ITEMS:,} "
        "items, else full")
    num_negatives: int = Field(1000, ge=1, description="sampled softmax negatives")
    kd_negatives: int = Field(64, ge=1, description="loss: sampled with a KD term: negatives drawn per training "
                              "position; the teacher's top-K and the target are always scored exactly")
    val_users: int = Field(50_000, ge=0, description="validation during training (checkpoint selection, early "
                           "stopping, Tune's metric) scores a fixed, seeded sample of at most this many users; "
                           "0 = every user. `evaluate`'s test metrics always cover every user")
    progress_s: float = Field(20.0, gt=0, description="inside an epoch, a progress line (steps, windows/s, ETA) "
                              "at most this often, once the epoch has run this long; the same for its "
                              "validation (users, users/s, ETA)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each Train worker reserves (fractions allowed)")
    use_gpu: bool = Field(False, description="one GPU per worker, bf16 autocast")
    max_failures: int = Field(2, ge=0, description="worker losses survived via checkpoints")
    trainer: Literal["auto", "ray_train"] = Field(
        "auto", description="auto: a run on one CPU worker trains as one Ray task (the same loop, checkpoints, "
        "resume and retries, without a Train worker group to start); several workers or a GPU use Ray Train's "
        "TorchTrainer. ray_train: always the TorchTrainer")

    def runs_in_task(self) -> bool:
        """Whether a run with these settings trains as one Ray task (raykd.cluster.task), not on a TorchTrainer."""
        return self.trainer == "auto" and self.num_workers == 1 and not self.use_gpu


def _teacher_model() -> ModelConfig:
    return ModelConfig(dim=64, layers=2, heads=2)


def _student_model() -> ModelConfig:
    return ModelConfig(dim=16, layers=1, heads=1)


class TeacherConfig(Section):
    model: ModelConfig = Field(default_factory=_teacher_model)
    train: TrainConfig = Field(default_factory=TrainConfig)
    item_text: bool = Field(False, description="use item text vectors (raykd embed-items) in the teacher")
    text_mode: Literal["fuse", "init", "both"] = Field(
        "both", description="fuse: add a trained projection of the PCA-whitened text vectors to the id embedding; "
        "init: start the id embeddings from them; both")
    init_std: float = Field(INIT_STD, gt=0, description="per-column std of item embeddings initialised from text")
    ensemble: int = Field(1, ge=1, le=16, description="teachers to train (seeds seed, seed+1, ...), as parallel Ray "
                          "runs when the cluster has room; soft labels average their log-probabilities")
    text_encoder: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model: local dir or name")
    text_workers: int = Field(1, ge=1, description="embedding actors (a GPU each with teacher.train.use_gpu)")

    @model_validator(mode="after")
    def _teacher_codes_are_teacher_free(self) -> TeacherConfig:
        table = self.model.item_table
        if table is not None and table.assign == "teacher":
            raise ValueError("teacher.model.item_table.assign teacher: a teacher has no teacher; use svd or text")
        if table is not None and table.assign == "text" and not self.item_text:
            raise ValueError("teacher.model.item_table.assign text needs the item text vectors: set "
                             "teacher.item_text=true (and data.item_text)")
        return self


class SoftLabelsConfig(Section):
    top_k: int = Field(100, ge=1, description="teacher items kept per training position")
    num_workers: int = Field(1, ge=1, description="scoring actors (one teacher copy each)")
    batch_size: int = Field(256, ge=1, description="windows (users × max_len) scored per forward pass")
    use_gpu: bool = Field(False, description="one GPU per scoring actor")


class DistillConfig(Section):
    model: ModelConfig = Field(default_factory=_student_model)
    train: TrainConfig = Field(default_factory=TrainConfig)
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of the KL (kl, kl_full); rank-weight "
                               "decay for rank")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term")
    loss: Literal["kl", "kl_full", "rank"] = Field(
        "kl", description="kl: KL over the teacher's top-K; kl_full: (K+1)-bin KL over top-K and the rest of the "
        "catalogue; rank: ranking distillation of the teacher's top-10")
    transfer: bool = Field(False, description="start the student's item table from the teacher's item "
                           "representations, PCA-reduced to its width (embedding transfer)")
    sizes: list[int | str] = Field(default_factory=list, description="students of the KD curve: dense widths "
                                   "(8: a dense 8-wide table) and PQ tables at the student's width ('pq4': 4 codes per "
                                   "item, the rest of distill.model.item_table or its defaults); each gets a KD student "
                                   "and a no-KD twin (report.json kd_curve, kd_curve.png)")
    train_nokd: bool = Field(True, description="also train the alpha=0 baseline student_nokd")
    teacher_scores: str | None = Field(None, description="external teacher scores (Parquet) instead of a raykd teacher")

    @model_validator(mode="after")
    def _external_scores_fit_the_loss(self) -> DistillConfig:
        if self.teacher_scores and self.loss == "kl_full":
            raise ValueError("distill.loss kl_full needs the teacher's log-mass outside its top-K, which external "
                             "distill.teacher_scores do not have: use loss kl or rank")
        if self.teacher_scores and self.transfer:
            raise ValueError("distill.transfer needs a raykd teacher's item table; external distill.teacher_scores "
                             "have none: set distill.transfer=false")
        for size in self.sizes:
            if isinstance(size, str) and not (re.fullmatch(r"pq[1-9][0-9]*", size) and int(size[2:]) <= self.model.dim):
                raise ValueError(f"distill.sizes entry {size!r}: a dense width (an integer) or pq<codes> with codes at "
                                 f"most distill.model.dim ({self.model.dim}), e.g. pq4")
            if isinstance(size, int) and size < 2:
                raise ValueError(f"distill.sizes entry {size}: a dense width needs at least 2 columns")
        table = self.model.item_table
        if table is not None and table.assign == "teacher" and not self.transfer:
            raise ValueError("distill.model.item_table.assign teacher reads the teacher's item table, which "
                             "distill.transfer brings: set distill.transfer=true, or assign svd or text")
        return self


class EvaluateConfig(Section):
    num_workers: int = Field(1, ge=1, description="Ray Data actors that score the test users (every user, every "
                             "model; each actor loads the models once and reads only its users' histories)")


class SearchDim(Section):
    """One searched config key: `loguniform`/`uniform` over [low, high], `int`, or `choice`."""

    type: Literal["loguniform", "uniform", "int", "choice"] = Field(description="how values are drawn")
    low: float | None = Field(None, description="lower bound (loguniform, uniform, int)")
    high: float | None = Field(None, description="upper bound (loguniform, uniform, int)")
    values: list[Any] | None = Field(None, description="the candidates (choice)")


def _default_space() -> dict[str, SearchDim]:
    return {
        "distill.temperature": SearchDim(type="loguniform", low=1.0, high=10.0),
        "distill.alpha": SearchDim(type="uniform", low=0.0, high=1.0),
        "distill.model.dim": SearchDim(type="choice", values=[8, 16, 32]),
        "distill.model.layers": SearchDim(type="choice", values=[1, 2]),
        "distill.train.lr": SearchDim(type="loguniform", low=3e-4, high=3e-3),
    }


class TuneConfig(Section):
    """Ray Tune + Optuna search over distillation settings (the tune stage)."""

    enabled: bool = Field(True, description="run the tune stage in `raykd pipeline`")
    objective: Literal["ndcg", "pareto"] = Field("ndcg", description="pareto: NDCG vs student size")
    size_metric: Literal["params", "latency"] = Field("params", description="pareto's second objective")
    max_quality_drop: float = Field(0.02, ge=0, lt=1, description="pareto pick: within this of the best")
    num_samples: int = Field(6, ge=1, description="trials")
    max_concurrent_trials: int = Field(1, ge=1, description="trials running at once")
    time_budget_s: float | None = Field(None, gt=0, description="stop starting trials after this")
    grace_period: int = Field(2, ge=1, description="ASHA: epochs before a trial can be stopped")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs of each in-process trial, or of each Train "
                                  "worker of a trial on Ray Train (which also keeps one CPU for Ray Data)")
    in_process: bool = Field(True, description="trials of a 1-worker CPU student train inside the Tune trial (no "
                             "Ray Train start); false keeps every trial on Ray Train")
    seed: int = Field(0, description="TPE sampler seed")
    space: dict[str, SearchDim] = Field(default_factory=_default_space,
                                        description="searched keys (dotted distill.* paths) and their ranges")


class ServeConfig(Section):
    """Ray Serve deployment of the student (the serve stage)."""

    host: str = Field("127.0.0.1", description="bind address; anything but loopback (127.0.0.1, ::1, "
                      "localhost) is refused without an API key")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy")
    max_batch_size: int = Field(32, ge=1, description="@serve.batch size")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="@serve.batch wait for a fuller batch")
    min_replicas: int = Field(1, ge=0, description="autoscaling floor")
    max_replicas: int = Field(2, ge=1, description="autoscaling ceiling")
    target_ongoing_requests: float = Field(16, gt=0, description="autoscaling target per replica")
    replica_cpus: float = Field(0.5, gt=0, description="CPUs each replica reserves")
    max_k: int = Field(100, ge=1, description="largest k a request may ask for")
    max_history: int = Field(1000, ge=1, description="longest history a request may send")
    max_body_bytes: int = Field(65536, ge=1024, description="longer request bodies get 413, chunked or not")
    api_key: SecretStr | None = Field(None, description="bearer token, a secret: never written to config.yaml; "
                                      "prefer RAYKD_API_KEY or api_key_file, never a command line")
    api_key_file: str | None = Field(None, description="file holding the bearer token, read where the app is built "
                                     "and by each replica; also RAYKD_API_KEY_FILE")
    access_log: bool = Field(False, description="per-request logs cost ~30% of throughput")
    max_batch_users: int = Field(256, ge=1, description="most /recommend bodies in one POST /recommend/batch "
                                 "(more: 422 for the whole batch); the whole body still counts against max_body_bytes")
    exclude_seen: bool = Field(True, description="never recommend an item of the user's history (a request's "
                               "default); evaluate scores test targets by the same rule, so report.json describes "
                               "what is served")
    ann: bool = Field(False, description="answer from an approximate index (faiss HNSW, pip install "
                      "\"raykd[ann]\"): a bundle's own (raykd export --ann), else built from the model's item "
                      "table as each replica starts (minutes at 1M items); its recall@10 against exact is in GET "
                      "/model. Off: exact scoring")

    @model_validator(mode="after")
    def _replicas_in_order(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas}): "
                             "raise max_replicas or lower min_replicas")
        return self

    @model_validator(mode="after")
    def _exposed_needs_a_key(self) -> ServeConfig:
        has_key = self.api_key is not None or self.api_key_file or os.environ.get(API_KEY_ENV) or \
            os.environ.get(API_KEY_FILE_ENV)
        if not has_key and not is_loopback(self.host):
            raise ValueError(f"host {self.host} is reachable from other machines but no API key is set: set the "
                             f"{API_KEY_ENV} (or {API_KEY_FILE_ENV}) environment variable or "
                             "serve.api_key_file, or bind 127.0.0.1")
        return self


class RayConfig(Section):
    address: str | None = Field(None, description="existing cluster; default: RAY_ADDRESS or local")
    num_cpus: int | None = Field(None, ge=1, description="local Ray only; default all cores")


class TrackingConfig(Section):
    """Experiment tracking through Ray's integrations: each training run's epochs, Tune's trials, the report."""

    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "none", description="where metrics go: tensorboard (event files), mlflow (a tracking server or store), "
        "wandb (Weights & Biases; needs WANDB_API_KEY or `wandb login`), or none")
    uri: str | None = Field(None, description="tensorboard: folder for the event files (default <run>/tensorboard); "
                            "mlflow: tracking URI (default sqlite:///<run>/mlflow.db, a file: URI also works; e.g. http://host:5000); wandb: the W&B "
                            "server (default WANDB_BASE_URL, else wandb.ai)")
    project: str | None = Field(None, description="mlflow experiment or wandb project (default: the config's name)")


class Config(Section):
    name: str = Field("quickstart", description="experiment name")
    output_dir: str = Field("runs/quickstart", description="the run directory every stage reads and writes")
    seed: int = Field(0, description="seed of every stage (init, shuffling, splits of ties)")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    soft_labels: SoftLabelsConfig = Field(default_factory=SoftLabelsConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _text_source(self):
        if self.teacher.item_text and not self.distill.teacher_scores and self.data.item_text is None \
                and self.data.format != "movielens":
            raise ValueError("teacher.item_text needs item text: set data.item_text (path, id_col, text_cols), or for "
                             "a log without item text set teacher.item_text=false and distil from several id-only "
                             "teachers (teacher.ensemble=3)")
        return self
