"""Shared fixtures: tiny random reference checkpoints written once per session; 8 CPU devices for mesh tests."""

import os

# Before JAX starts: the sharding tests need a mesh of 8 devices (single-device code runs on the first).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# libtpu is installed for the ahead-of-time TPU compiles; the tests (and the commands they start) run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The TPU-program tests (ahead-of-time TPU compiles through libtpu, the Pallas kernel in TPU interpret mode) run in
# a pytest process of their own, started by tests/test_tpu_programs.py, not in the process of every other test.
collect_ignore = [] if os.environ.get("ATP_JAX_TPU_TESTS") == "1" else ["tpu"]

import pytest  # noqa: E402

from atp_jax.models.config import LlavaConfig  # noqa: E402
from atp_jax.testing.reference import save_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg() -> LlavaConfig:
    return LlavaConfig.tiny()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_cfg):
    """(directory, torch model) of a tiny llava-hf checkpoint as transformers writes it."""
    d = tmp_path_factory.mktemp("hf") / "tiny"
    model = save_hf_model(tiny_cfg, d, seed=0)
    return d, model
