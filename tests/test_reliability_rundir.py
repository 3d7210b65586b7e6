"""Reliability of the run directory and the stage runner (issue 26, items 4, 9, 15, 16, 17)."""

from __future__ import annotations

import pytest

from raykd.errors import RaykdError
from tests.conftest import tiny_config


@pytest.mark.parametrize(("name", "setting"), [("embed_items", "teacher.item_text"), ("tune", "tune.enabled")])
def test_named_disabled_stage_is_an_error_naming_its_setting(tmp_path, name, setting):
    """`raykd embed-items` on a config without item text must not exit 0 having done nothing."""
    cfg = tiny_config(tmp_path)
    with pytest.raises(RaykdError, match=setting.replace(".", r"\.")):
        __import__("raykd.stages").stages.run(cfg, [name])
    assert not (tmp_path / "run.lock").exists()
