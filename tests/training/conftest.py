"""Fixtures of the training tests: one prepared tiny subject with its tiny-CLIP feature store."""

from __future__ import annotations

import pytest

from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.features.extract import extract_features


@pytest.fixture(scope="package")
def tiny_data(tiny_nsd, tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    prepared = prepare_subject(tiny_nsd.root, 1, base / "prepared", PrepareOptions(), progress=False)
    extract_features([prepared.root], base / "features", model="tiny", progress=False)
    return prepared.root, base / "features"
