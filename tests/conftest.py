"""Shared fixtures: tiny random reference checkpoints written once per session."""

import pytest

from atp_jax.models.config import LlavaConfig
from atp_jax.testing.reference import save_hf_model


@pytest.fixture(scope="session")
def tiny_cfg() -> LlavaConfig:
    return LlavaConfig.tiny()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_cfg):
    """(directory, torch model) of a tiny llava-hf checkpoint as transformers writes it."""
    d = tmp_path_factory.mktemp("hf") / "tiny"
    model = save_hf_model(tiny_cfg, d, seed=0)
    return d, model
