"""Every run config loads, validates and builds its optimizer groups; the full-size ones ask for a checkpoint."""

import importlib
from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "llava15")  # llava15.py: shared recipe


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds_its_optimizer(name):
    from atp_jax.pruning.config import PruningConfig
    from atp_jax.train.trainer import optim_config

    config = importlib.import_module(f"configs.{name}").get_config()
    ocfg = optim_config(config)
    assert ocfg.total_steps == config.total_steps > 0
    PruningConfig(mode="soft", **{k: tuple(v) if isinstance(v, list | tuple) else v
                                  for k, v in config.pruning.to_dict().items()})
    if name.startswith("llava15"):
        assert config.mesh.fsdp == -1 and config.model.remat and r"vision_tower/" in ocfg.frozen
        if "pretrain" in name:  # stage 1: the projector alone
            assert [g[0] for g in ocfg.groups] == ["atp", "projector"] and r"language_model/" in ocfg.frozen
        if name.endswith("atp"):
            assert {g[0]: g[1] for g in ocfg.groups} == {"atp": 1e-4, "llm": 2e-5, "projector": 2e-5}


def test_full_size_configs_need_a_checkpoint():
    from atp_jax.train.trainer import build_model

    config = importlib.import_module("configs.llava15_7b_atp").get_config()
    with pytest.raises(ValueError, match="init_from"):
        build_model(config, 32000, 32000)
