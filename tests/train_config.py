"""configs/tiny_synthetic.py shrunk for the training tests: 4x4 patches, a 2-layer decoder, ATP after layer 0."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs.tiny_synthetic import get_config as tiny_synthetic  # noqa: E402


def get_config():
    c = tiny_synthetic()
    c.stages = ()  # one run, not the tiny chain
    c.total_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 3, 8, 1, 0, 2
    c.model.vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, image_size=56)
    c.model.text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)
    c.pruning.atp_layers = (0,)
    c.data.update(shapes_train_size=64, max_length=96, eval_split="")
    return c
