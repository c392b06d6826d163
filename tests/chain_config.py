"""The main job's chain at test size: tests/train_config.py's model, two short stages, a small report."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ml_collections import ConfigDict  # noqa: E402

from configs.tiny_synthetic import get_config as tiny_synthetic  # noqa: E402
from tests.train_config import get_config as train_config  # noqa: E402


def get_config():
    c = train_config()
    chain = tiny_synthetic()
    c.stages = ("pretrain", "atp")
    c.stage_overrides = ConfigDict(dict(pretrain=chain.stage_overrides.pretrain, atp=chain.stage_overrides.atp))
    c.stage_overrides.pretrain.total_steps = 2
    c.stage_overrides.atp.total_steps = 2
    c.report = ConfigDict(dict(enabled=True, test_size=12, batch_size=8, timing_batch=4, visualizations=2))
    return c
