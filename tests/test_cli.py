"""The command line: every stage has --help, every option is documented in the README, configs resolve."""
from pathlib import Path

import pytest

from enpcg.cli import main
from enpcg.config import STAGES, resolve_config
from enpcg.errors import EnpcgError

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("stage", list(STAGES))
def test_help_and_readme(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        main([stage, "--help"])
    assert exc.value.code == 0
    assert f"enpcg {stage}" in capsys.readouterr().out
    assert f"### `enpcg {stage}`" in README
    for key in STAGES[stage]:
        assert f"`--{key.replace('_', '-')}`" in README, f"README lacks enpcg {stage} --{key}"


def test_precedence_and_types(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sample:\n  n_frames: 50\n  temperature: 400\n")
    out = resolve_config("sample", cfg, {"temperature": 300})
    assert out["n_frames"] == 50 and out["temperature"] == 300.0 and out["interval_steps"] == 500
    with pytest.raises(EnpcgError, match="n_frames must be int"):
        resolve_config("sample", None, {"n_frames": "many"})
    with pytest.raises(EnpcgError, match="one of"):
        resolve_config("fit", None, {"model": "gaussian"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(EnpcgError, match=str(bad)):
        resolve_config("fit", bad)
