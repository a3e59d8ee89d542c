"""The command line's error contract: a user's mistake is one line and exit 1; a bug keeps its traceback."""

from __future__ import annotations

import pytest

import brainmclip.config
from brainmclip.cli import main

SIZES = ["--semantic-voxels", "8", "--detail-voxels", "8", "--embed-dim", "16"]


@pytest.mark.parametrize("argv, names", [
    (["info", "--config", "no_such_config", *SIZES], ["no_such_config", "brain_mclip_tiny"]),
    (["info", "--config", "brain_mclip_tiny", "--set", "train.no_such_key=1", *SIZES], ["no_such_key", "epochs"]),
    (["info", "--config", "brain_mclip_tiny", "--set", "no_such_section.x=1", *SIZES], ["no_such_section"]),
    (["info", "--config", "brain_mclip_tiny", "--set", "model=3", *SIZES], ["model", "hidden_dim"]),
    (["info", "--config", "brain_mclip_tiny", "--set", 'model.branches=["no_such_branch"]', *SIZES],
     ["no_such_branch", "image_semantic"]),
    (["info", "--config", "brain_mclip_tiny", "--set", "model.hidden_dim=0", *SIZES], ["model.hidden_dim=0", ">= 1"]),
    (["info", "--config", "brain_mclip_tiny", "--set", "model.dropout=nan", *SIZES], ["model.dropout='nan'", "[0, 1)"]),
])
def test_unknown_names_are_one_line_errors(argv, names, capsys):
    assert main(["-q", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("brainmclip info: error:"), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)


def test_an_internal_key_error_is_not_swallowed(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(brainmclip.config, "load_config", broken)
    with pytest.raises(KeyError, match="internal"):
        main(["-q", "info", *SIZES])
    assert "error:" not in capsys.readouterr().err
