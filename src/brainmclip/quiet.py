"""Hugging Face libraries' loading output, silenced while a model loads from a local folder."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def quiet_hf_loading(errors_only: bool = False):
    """No loading bars inside the block: transformers draws one per weight file and diffusers one per pipeline
    component, which land in the middle of our own progress output for loads that take well under a second.

    diffusers is silenced only when it is already imported (whoever loads its models has imported it), so a
    CLIP-only load does not pay for importing it. ``errors_only`` also hides transformers' warnings (a tower read
    from a two-tower checkpoint logs every tensor of the other tower as unexpected). Settings are restored after.
    """
    from transformers.utils import logging as transformers_logging

    libs = [transformers_logging]
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        libs.append(diffusers_logging)
    bars = [(lib, lib.is_progress_bar_enabled()) for lib in libs]
    verbosity = transformers_logging.get_verbosity()
    for lib in libs:
        lib.disable_progress_bar()
    if errors_only:
        transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        for lib, enabled in bars:
            if enabled:
                lib.enable_progress_bar()
