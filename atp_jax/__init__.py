"""atp_jax: ATP-LLaVA (adaptive visual-token pruning) on a faithful LLaVA-1.5 in JAX/Flax NNX."""

from atp_jax.convert.checkpoint import load_pretrained
from atp_jax.models.common import DtypePolicy
from atp_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from atp_jax.models.llava import LlavaForConditionalGeneration, LlavaOutput, forward

__all__ = ["DtypePolicy", "LlavaConfig", "LlavaForConditionalGeneration", "LlavaOutput", "TextConfig",
           "VisionConfig", "forward", "load_pretrained"]
