"""Configs of the checkpoints we read: llava-hf `config.json`, original LLaVA `config.json`, CLIP `config.json`."""

from __future__ import annotations

import json
from pathlib import Path

from atp_jax.convert.readers import CheckpointError
from atp_jax.models.config import ConfigError, LlavaConfig, VisionConfig, text_from_hf_dict, vision_from_hf_dict

# Original-LLaVA config fields about training or tokenisation that do not change the network.
_ORIGINAL_TRAINING_FIELDS = frozenset({
    "mm_vision_tower", "mm_hidden_size", "image_aspect_ratio", "image_grid_pinpoints", "mm_patch_merge_type",
    "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "mm_projector_lr", "tune_mm_vision_tower",
    "unfreeze_mm_vision_tower", "use_mm_proj", "mm_vision_tower_lr", "tokenizer_model_max_length",
    "tokenizer_padding_side", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_projector_type", "freeze_backbone", "freeze_mm_vision_resampler",
    "tune_mm_vision_resampler", "mm_resampler_type",
})
_CLIP_L14_336 = "clip-vit-large-patch14-336"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def is_original_config(d: dict) -> bool:
    return "mm_projector_type" in d or d.get("model_type") == "llava_llama"


def clip_vision_config(directory: Path) -> VisionConfig:
    d = read_json(directory / "config.json")
    return vision_from_hf_dict(d["vision_config"] if d.get("model_type") == "clip" else d)


def original_config(d: dict, vision: VisionConfig | None) -> LlavaConfig:
    """LlavaConfig for a `liuhaotian/llava-v1.5-*` style config (LLaMA fields + `mm_*` fields)."""
    d = dict(d)
    if d.get("mm_use_im_start_end") or d.get("mm_use_im_patch_token"):
        raise ConfigError("mm_use_im_start_end / mm_use_im_patch_token checkpoints are not supported")
    if d.get("mm_patch_merge_type", "flat") != "flat":
        raise ConfigError(f"mm_patch_merge_type {d['mm_patch_merge_type']!r} is not supported (only 'flat')")
    if vision is None:
        if _CLIP_L14_336 not in str(d.get("mm_vision_tower", "")):
            raise ConfigError(f"vision tower {d.get('mm_vision_tower')!r}: pass its CLIP directory (--vision-src)")
        vision = VisionConfig()  # openai/clip-vit-large-patch14-336
    projector = d.get("mm_projector_type", "linear")
    if projector not in ("mlp2x_gelu", "linear"):
        raise ConfigError(f"mm_projector_type {projector!r} is not supported (mlp2x_gelu, linear)")
    select = d.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"mm_vision_select_feature {select!r} is not supported (patch, cls_patch)")
    layer = d.get("mm_vision_select_layer", -2)
    mm_hidden = d.get("mm_hidden_size")
    n_layers = 1 if isinstance(layer, int) else len(layer)
    if mm_hidden is not None and mm_hidden != vision.hidden_size * n_layers:
        raise ConfigError(f"mm_hidden_size {mm_hidden} does not match the CLIP width {vision.hidden_size}")
    text = text_from_hf_dict({**{k: v for k, v in d.items() if k not in _ORIGINAL_TRAINING_FIELDS},
                              "model_type": "llama"})
    strategy = "default" if select == "patch" else "full"
    num_image_tokens = vision.num_patches + (strategy == "full")
    # Original checkpoints splice the image by a placeholder; we give it the first id past the vocabulary,
    # the id llava-hf later assigned to <image>.
    return LlavaConfig(vision=vision, text=text, image_token_index=text.vocab_size, image_seq_length=num_image_tokens,
                       projector_type=projector, vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
                       vision_feature_select_strategy=strategy)


def checkpoint_config(src: Path, vision_src: Path | None = None) -> tuple[LlavaConfig, VisionConfig | None]:
    """Our config for a checkpoint directory (and the CLIP config from `vision_src`, if given)."""
    d = read_json(src / "config.json")
    vision_cfg = clip_vision_config(Path(vision_src)) if vision_src else None
    try:
        cfg = original_config(d, vision_cfg) if is_original_config(d) else LlavaConfig.from_hf_dict(d)
    except (ConfigError, TypeError, AttributeError, KeyError, ValueError) as e:  # also fields of the wrong kind
        raise ConfigError(f"{src / 'config.json'}: {e}") from e
    if vision_cfg is not None and vision_cfg != cfg.vision:
        raise ConfigError(f"--vision-src CLIP config {vision_cfg} differs from the checkpoint's {cfg.vision}")
    return cfg, vision_cfg
