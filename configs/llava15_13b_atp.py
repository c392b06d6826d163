"""LLaVA-1.5-13B atp: see configs/llava15.py for the recipe.

  python launch/train.py --config configs/llava15_13b_atp.py --workdir /shared/runs/llava15_13b_atp \
      --config.model.init_from=CONVERTED_CHECKPOINT --config.data.data_dir=TFDS_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs.llava15 import llava15  # noqa: E402


def get_config():
    return llava15("13b", "atp")
