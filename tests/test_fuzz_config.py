"""Fuzzing the config overrides (issue 26 item 3): any text is a config or a RaykdError, and a secret
given as serve.api_key, however spelled, is never echoed by the CLI."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raykd import cli
from raykd.config import Config, load_config
from raykd.core.errors import RaykdError

QUICKSTART = "configs/quickstart.yaml"
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SYNTAX = "=.:, {}[]'\"-_#&*!|>%@`\n\t~<"
KEYS = ["serve", "serve.api_key", "serve.port", "serve.host", "teacher.train.lr", "data", "data.synthetic.users",
        "tune.space", "distill", "name", "output_dir", "seed", "api_key", "Serve.api_key", "serve.API_KEY"]
chars = st.one_of(st.sampled_from(SYNTAX), st.characters(codec="utf-8", exclude_categories=("Cs",)))
text = st.text(chars, max_size=40)
override = st.one_of(
    text,
    st.builds(lambda k, sp, v: f"{k}{sp}={v}", st.sampled_from(KEYS), st.sampled_from(["", " ", "\t"]), text),
    st.builds(lambda k, v: f"{k}={{{v}}}", st.sampled_from(KEYS), text),
)


@FAST
@given(override)
def test_any_override_is_a_config_or_a_raykd_error(item):
    try:
        assert isinstance(load_config(QUICKSTART, [item]), Config)
    except RaykdError:
        pass


SHAPES = ["{a}serve.api_key{b}={c}{s}", "serve={{{a}api_key: {s}}}", "serve={{api_key: {s}, port: 8001}}",
          "serve={{api_key: {s}, host: 0.0.0.0}}", "serve={{api_key: {s}, bogus: 1}}", "serve={{api_key: {s}, port: x}}",
          'serve={{"api_key": "{s}"}}', "serve={{'api_key': '{s}'}}", "serve=api_key: {s}", "serve.api_key=[{s}]",
          "serve.api_key={{a: {s}}}", "serve.api_key={s}: 1", "serve.api_key=- {s}", "serve.api_key=!!binary {s}",
          "serve.api_key=&x {s}", "serve.api_key.x={s}", "serve.api_key.a.b={s}", "serve={{<<: {{api_key: {s}}}}}"]


@st.composite
def spelled_secret(draw) -> tuple[str, str]:
    """(an override that sets serve.api_key in some spelling, the secret it holds)."""
    key = "Zq9" + draw(st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=6,
                               max_size=20))
    space = st.sampled_from(["", " ", "  ", "\t"])
    shape = draw(st.sampled_from(SHAPES))
    return shape.format(s=key, a=draw(space), b=draw(space), c=draw(space)), key


@FAST
@given(spelled_secret(), st.sampled_from(["config", "serve", "prepare"]))
def test_the_cli_never_echoes_a_key_given_on_its_command_line(capsys, tmp_path_factory, spelled, command):
    item, key = spelled
    capsys.readouterr()
    here = tmp_path_factory.getbasetemp()
    (here / "afile").write_text("x")  # a run that got past the guard fails before Ray starts
    argv = {"config": ["config", "show", QUICKSTART, item], "serve": ["serve", str(here), item],
            "prepare": ["prepare", QUICKSTART, f"output_dir={here}/afile/run", item]}[command]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert key not in out + err and code == 1
    assert "RAYKD_API_KEY" in err, (item, err)


@pytest.mark.parametrize("item", ["=x", "a..b=secret-value", "=serve: {api_key: secret-value}"])
def test_malformed_overrides_do_not_repeat_their_value(item):
    with pytest.raises(RaykdError) as err:
        load_config(QUICKSTART, [item])
    assert "secret-value" not in str(err.value)
