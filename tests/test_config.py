"""Typed configs: unknown keys, dotted overrides, bad values, and the resolved config.yaml."""

from __future__ import annotations

import pytest
import yaml

from raykd.config import Config, load_config
from raykd.core import rundir
from raykd.core.errors import RaykdError


def write_yaml(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_quickstart_config_loads():
    cfg = load_config("configs/quickstart.yaml")
    assert cfg.data.format == "synthetic"
    assert cfg.data.synthetic.users == 2000


def test_defaults_without_a_file():
    assert load_config(None) == Config()


def test_unknown_top_level_key_names_it_and_the_valid_keys(tmp_path):
    path = write_yaml(tmp_path, "nmae: x\n")
    with pytest.raises(RaykdError) as err:
        load_config(path)
    msg = str(err.value)
    assert "'nmae'" in msg and str(path) in msg
    for valid in ("name", "output_dir", "data", "teacher", "distill"):
        assert valid in msg


def test_unknown_nested_key_names_it_and_the_valid_keys(tmp_path):
    path = write_yaml(tmp_path, "data:\n  fromat: csv\n")
    with pytest.raises(RaykdError, match=r"unknown key 'data\.fromat'; valid keys here: format, path, user_col"):
        load_config(path)


def test_unknown_key_in_an_override():
    with pytest.raises(RaykdError, match=r"unknown key 'teacher\.train\.learning_rate'.*\blr\b"):
        load_config(None, ["teacher.train.learning_rate=0.1"])


def test_dotted_overrides_are_typed_as_yaml(tmp_path):
    path = write_yaml(tmp_path, "data:\n  format: csv\n  path: x.csv\n  time_col: ts\n")
    cfg = load_config(path, ["teacher.train.lr=3e-4", "data.time_col=null", "data.header=false",
                             "teacher.train.epochs=7", "output_dir=runs/x", "data.user_col=0"])
    assert cfg.teacher.train.lr == pytest.approx(3e-4)
    assert cfg.data.time_col is None
    assert cfg.data.header is False
    assert cfg.teacher.train.epochs == 7
    assert cfg.output_dir == "runs/x"
    assert cfg.data.user_col == "0"  # a column index, as YAML gives it, becomes the column's name
    assert cfg.data.path == "x.csv"  # untouched keys keep the file's values


def test_override_beats_the_file_and_an_empty_section_takes_overrides(tmp_path):
    path = write_yaml(tmp_path, "data:\nteacher:\n  train: {lr: 0.1}\n")
    cfg = load_config(path, ["data.format=parquet", "teacher.train.lr=0.2"])
    assert cfg.data.format == "parquet" and cfg.teacher.train.lr == 0.2


@pytest.mark.parametrize("override, message", [
    ("teacher.train.lr", "not of the form key=value"),
    ("=3", "not of the form key=value"),
    ("teacher..lr=3", "not a dotted key"),
    ("name.x=3", r"name: Input should be a valid string \(got \{'x': 3\}\)"),
])
def test_bad_override_syntax(override, message):
    with pytest.raises(RaykdError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("teacher.train.epochs=-1", r"teacher\.train\.epochs: Input should be greater than or equal to 1 \(got -1\)"),
    ("data.format=xml", r"data\.format: Input should be 'movielens', 'csv'"),
    ("data.min_user_interactions=2", r"data\.min_user_interactions"),
    ("distill.alpha=1.5", r"distill\.alpha"),
    ("data.delimiter=ab", r"data\.delimiter: must be one character"),
    ("teacher.train.lr=fast", r"teacher\.train\.lr: Input should be a valid number"),
])
def test_bad_values(override, message):
    with pytest.raises(RaykdError, match=message):
        load_config(None, [override])


def test_override_that_is_not_yaml_is_text():
    assert load_config(None, ["data.path=[a"]).data.path == "[a"
    assert load_config(None, ["data.path=runs/[a]:b{c.csv"]).data.path == "runs/[a]:b{c.csv"
    assert load_config(None, ["data.path="]).data.path is None


def test_override_into_a_value_set_by_the_file(tmp_path):
    with pytest.raises(RaykdError, match="'name' is not a section"):
        load_config(write_yaml(tmp_path, "name: run\n"), ["name.x=3"])


def test_delimiter_spellings():
    for spelling in ("\\t", "tab", "\t"):
        assert load_config(None, [f"data.delimiter={spelling}"]).data.delimiter == "\t"
    for symbol in ";|-#>?":  # YAML syntax on its own, a delimiter here
        assert load_config(None, [f"data.delimiter={symbol}"]).data.delimiter == symbol


def test_min_rating_needs_a_rating_column():
    with pytest.raises(RaykdError, match="data.min_rating needs data.rating_col"):
        load_config(None, ["data.format=csv", "data.min_rating=4"])
    with pytest.raises(RaykdError, match="synthetic logs have no ratings"):
        load_config(None, ["data.min_rating=4"])
    assert load_config(None, ["data.format=movielens", "data.min_rating=4"]).data.min_rating == 4


def test_missing_config_file(tmp_path):
    with pytest.raises(RaykdError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "must hold a mapping of sections, got list"),
    ("just text\n", "must hold a mapping of sections, got str"),
    ("data: [1,\n", "is not valid YAML"),
])
def test_non_mapping_or_invalid_yaml(tmp_path, text, message):
    with pytest.raises(RaykdError, match=message):
        load_config(write_yaml(tmp_path, text))


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == Config()


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["teacher.train.lr=3e-4", "data.synthetic.users=10"])
    rundir.dump_config(cfg, tmp_path / "run")
    raw = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert raw["teacher"]["train"]["lr"] == pytest.approx(3e-4)
    assert raw["data"]["min_item_interactions"] == 5  # every default spelled out
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_kd_curve_reuses_the_main_student_at_its_own_width(tmp_path):
    from raykd.training.plan import curve_pair, sized

    cfg = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", "distill.sizes=[4,16,32]"])
    assert curve_pair(cfg, 16) == ("student", "student_nokd")  # distill.model.dim is 16
    assert curve_pair(cfg, 4) == ("kd_curve/d4/student", "kd_curve/d4/student_nokd")
    off = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"train_nokd": False})})
    assert curve_pair(off, 16)[0] == "kd_curve/d16/student"  # no twin trained at the main width
    assert sized(cfg.distill.model.model_copy(update={"heads": 2}), 6).heads == 2
    assert sized(cfg.distill.model.model_copy(update={"heads": 2}), 5).heads == 1


def test_heads_must_divide_dim_before_ray_starts():
    with pytest.raises(RaykdError, match="divisible by heads"):
        load_config("configs/quickstart.yaml", ["teacher.model.dim=30", "teacher.model.heads=4"])


def test_item_text_accepts_a_tab_and_a_single_text_column():
    cfg = load_config("configs/beauty.yaml", ["data.item_text.delimiter=\\t", "data.item_text.text_cols=keywords",
                                              "data.item_text.id_col=sku"])
    assert cfg.data.item_text.delimiter == "\t" and cfg.data.item_text.text_cols == ["keywords"]
    with pytest.raises(RaykdError, match="one character"):
        load_config("configs/beauty.yaml", ["data.item_text.delimiter=;;"])


@pytest.mark.parametrize("setting, message", [("distill.loss=kl_full", "kl_full needs"),
                                              ("distill.transfer=true", "transfer needs")])
def test_external_scores_refuse_what_needs_a_raykd_teacher(setting, message):
    with pytest.raises(RaykdError, match=message):
        load_config("configs/quickstart.yaml", ["distill.teacher_scores=s.parquet", setting])


def test_every_config_key_has_a_description():
    from raykd.config import docs as config_docs

    missing = [key for key, description in config_docs.described_keys() if not description]
    assert not missing, f"keys without a description: {missing}"
    assert ("tune.space.<key>.low", "lower bound (loguniform, uniform, int)") in config_docs.described_keys()


def test_config_show_is_the_resolved_config_with_descriptions(capsys):
    from raykd.cli import main

    assert main(["config", "show", "configs/beauty.yaml", "tune.num_samples=7"]) == 0
    text = capsys.readouterr().out
    assert "  num_samples: 7  # trials\n" in text
    shown = yaml.safe_load(text)  # the comments are YAML comments: the text loads as the config
    assert Config.model_validate(shown) == load_config("configs/beauty.yaml", ["tune.num_samples=7"])


def test_config_schema_and_version(capsys):
    import json
    import subprocess
    import sys

    from raykd.cli import main

    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False and "distill" in schema["properties"]
    out = subprocess.run([sys.executable, "-m", "raykd", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("raykd ")


def test_unknown_key_in_an_optional_section_lists_its_keys():
    with pytest.raises(RaykdError, match="valid keys here: path, id_col, text_cols, delimiter"):
        load_config("configs/beauty.yaml", ["data.item_text.foo=1"])
    with pytest.raises(RaykdError, match="valid keys here: type, low, high, values"):
        load_config("configs/quickstart.yaml", ["tune.space.x.bogus=1"])


def test_text_teacher_without_item_text_fails_at_load_with_the_no_text_recipe():
    # A log with no item text, run through the text-teacher recipe: before, prepare ran and the
    # pipeline only failed at embed_items, without saying what to use instead.
    with pytest.raises(RaykdError, match=r"teacher.item_text=false.*teacher.ensemble"):
        load_config("configs/beauty.yaml", ["data.item_text=null"])
    cfg = load_config("configs/beauty.yaml", ["data.item_text=null", "teacher.item_text=false", "teacher.ensemble=3"])
    assert cfg.teacher.ensemble == 3 and cfg.distill.transfer
    # MovieLens logs carry their own titles; external teacher scores need no text
    load_config("configs/ml100k.yaml", ["teacher.item_text=true"])
