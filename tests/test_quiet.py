"""quiet_hf_loading: the Hugging Face libraries' loading bars (and, on request, transformers' warnings) off inside
the block, their settings as they were after it, an exception included."""

from __future__ import annotations

import logging

import pytest
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from brainmclip.quiet import quiet_hf_loading


@pytest.mark.parametrize("errors_only", [False, True])
def test_silences_and_restores(errors_only):
    transformers_logging.enable_progress_bar()
    diffusers_logging.enable_progress_bar()
    transformers_logging.set_verbosity_warning()
    with pytest.raises(RuntimeError), quiet_hf_loading(errors_only=errors_only):
        assert not transformers_logging.is_progress_bar_enabled()
        assert not diffusers_logging.is_progress_bar_enabled()  # imported above, so silenced too
        want = logging.ERROR if errors_only else logging.WARNING
        assert transformers_logging.get_verbosity() == want
        raise RuntimeError("a failed load")
    assert transformers_logging.is_progress_bar_enabled() and diffusers_logging.is_progress_bar_enabled()
    assert transformers_logging.get_verbosity() == logging.WARNING


def test_leaves_disabled_bars_disabled():
    transformers_logging.disable_progress_bar()
    try:
        with quiet_hf_loading():
            pass
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
