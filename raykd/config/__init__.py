"""Typed experiment configs: one YAML file, one section per stage, defaults defined in one place.

`sections` holds the pydantic models (every key described, unknown keys rejected), `loading` reads
YAML plus dotted overrides (`load_config(path, overrides)`), `explain` turns validation errors into
sentences, `docs` writes the config reference, `auth` resolves the serving API key. The names
below are the public ones; import them from `raykd.config`.
"""

from raykd.config.explain import explain, section_type
from raykd.config.loading import load_config, section_hash
from raykd.config.sections import (
    INIT_STD,
    SAMPLED_ABOVE_ITEMS,
    Config,
    DataConfig,
    DistillConfig,
    ItemTableConfig,
    ItemTextConfig,
    ModelConfig,
    RayConfig,
    SearchDim,
    Section,
    ServeConfig,
    SoftLabelsConfig,
    SyntheticConfig,
    TeacherConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = ["INIT_STD", "SAMPLED_ABOVE_ITEMS", "Config", "DataConfig", "DistillConfig", "ItemTableConfig", "ItemTextConfig", "ModelConfig", "RayConfig",
           "SearchDim", "Section", "ServeConfig", "SoftLabelsConfig", "SyntheticConfig", "TeacherConfig",
           "TrackingConfig", "TrainConfig", "TuneConfig", "explain", "load_config", "section_hash", "section_type"]
