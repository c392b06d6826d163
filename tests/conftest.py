"""Shared fixtures: tiny random reference checkpoints written once per session; 8 CPU devices for mesh tests."""

import os

# Before JAX starts: the sharding tests need a mesh of 8 devices (single-device code runs on the first).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# libtpu is installed for the ahead-of-time TPU compiles; the tests (and the commands they start) run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The TPU-program tests (ahead-of-time TPU compiles through libtpu, the Pallas kernel in TPU interpret mode) run in
# a pytest process of their own, started by tests/test_tpu_programs.py, not in the process of every other test.
collect_ignore = [] if os.environ.get("ATP_JAX_TPU_TESTS") == "1" else ["tpu"]

import gc  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
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


def _memory_mappings() -> tuple[int, int] | None:
    """(this process's memory mappings, the kernel's limit on them), where Linux says; else None."""
    maps, limit = Path("/proc/self/maps"), Path("/proc/sys/vm/max_map_count")
    if not (maps.exists() and limit.exists()):
        return None
    with maps.open() as f:
        return sum(1 for _ in f), int(limit.read_text())


@pytest.fixture(autouse=True)
def _bounded_memory_mappings():
    """Drops JAX's compiled programs once the process holds half the mappings the kernel allows.

    XLA:CPU maps the code and data of every kernel it compiles into mappings of their own (three per kernel), and
    JAX keeps every program it compiled while its function lives. One pytest process compiling the whole suite's
    programs crossed Linux's default limit of 65530 mappings (vm.max_map_count), and the next compile segfaulted
    inside XLA. Dropping the caches unmaps them; later tests recompile what they need.
    """
    yield
    counts = _memory_mappings()
    if counts is not None and counts[0] > counts[1] // 2:
        jax.clear_caches()
        gc.collect()
