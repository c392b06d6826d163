"""Every run config loads, validates and builds its optimizer groups; the full-size ones ask for a checkpoint."""

import importlib
from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "llava15")  # llava15.py: shared recipe


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds_its_optimizer(name):
    from atp_jax.pruning.config import PruningConfig
    from atp_jax.train.optim import PATTERNS
    from atp_jax.train.program import optim_config

    config = importlib.import_module(f"configs.{name}").get_config()
    ocfg = optim_config(config)
    # the schedule spans the run's optimizer updates: train steps over the micro-batches each update averages
    assert ocfg.total_steps == -(-config.total_steps // config.optim.accumulation_steps) > 0
    assert config.batch_size * config.optim.accumulation_steps == (256 if "pretrain" in name else
                                                                   128 if name.startswith("llava15") else 16)
    PruningConfig(**{k: tuple(v) if isinstance(v, list | tuple) else v
                                  for k, v in config.pruning.to_dict().items()})
    if name.startswith("llava15"):
        assert config.mesh.fsdp == -1 and config.model.remat and PATTERNS["vision"] in ocfg.frozen
        if "pretrain" in name:  # stage 1: the projector alone
            assert [g[0] for g in ocfg.groups] == ["atp", "projector"] and PATTERNS["llm"] in ocfg.frozen
        if name.endswith("atp"):
            assert {g[0]: g[1] for g in ocfg.groups} == {"atp": 1e-4, "llm": 2e-5, "projector": 2e-5}


def test_full_size_configs_need_a_checkpoint():
    from atp_jax.train.program import build_model

    config = importlib.import_module("configs.llava15_7b_atp").get_config()
    with pytest.raises(ValueError, match="init_from"):
        build_model(config, 32000, 32000)


def test_every_stage_of_the_main_job_is_a_valid_run(tmp_path):
    from atp_jax.pruning.config import PruningConfig
    from atp_jax.train.program import optim_config
    from atp_jax.train.stages import stage_configs

    config = importlib.import_module("configs.tiny_synthetic").get_config()
    got = dict(stage_configs(config, tmp_path))
    for name, c in got.items():
        groups = {g[0] for g in optim_config(c).groups}
        PruningConfig(**{k: tuple(v) if isinstance(v, list | tuple) else v
                                      for k, v in c.pruning.to_dict().items()})
        assert ("atp" in groups) == (name == "atp") == (c.pruning.method == "atp"), name
    assert "vision" not in {g[0] for g in optim_config(got["atp"]).groups}  # frozen in the ATP stage, as the paper


def test_data_shapes_fields_change_the_synthetic_set():
    from atp_jax.train.data import shapes_config

    config = importlib.import_module("configs.tiny_synthetic").get_config()
    assert shapes_config(config).max_objects == 4 and shapes_config(config).image_size == 168
    config.data.shapes.max_objects = 3
    assert shapes_config(config).max_objects == 3
