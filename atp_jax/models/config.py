"""LLaVA-1.5 configuration: frozen dataclasses, strict readers and writers of HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that atp_jax cannot represent faithfully."""


# HF bookkeeping fields that carry no architecture: accepted on read and not written back.
_HF_IGNORED = frozenset({
    "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "model_type",
    "initializer_range", "initializer_factor", "use_cache", "attention_dropout", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "tokenizer_class", "max_length", "_attn_implementation_autoset", "dropout",
    "layer_types",
})
# transformers' defaults for fields a config.json may leave out (LlamaConfig, CLIPVisionConfig).
_HF_TEXT_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
                     "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
_HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "layer_norm_eps": 1e-5,
                       "projection_dim": 512}
# LlavaConfig's vision tower when config.json names none: CLIP ViT-L/14-336.
_HF_LLAVA_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                    "image_size": 336, "patch_size": 14, "projection_dim": 768}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (HF `CLIPVisionConfig`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # unused by the vision model; kept so export writes it back

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA/Vicuna decoder (HF `LlamaConfig`)."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # HF `head_dim`; None means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0  # HF `rope_parameters["rope_theta"]` (v5) or `rope_theta` (v4)
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF `rope_parameters` minus type/theta, sorted
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling or ()).get("rope_type", "default")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """LLaVA-1.5 = CLIP vision tower + projector + LLaMA decoder (HF `LlavaConfig`)."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_index: int = 32000
    image_seq_length: int = 576
    projector_type: str = "mlp2x_gelu"  # HF projector_hidden_act "gelu"; "linear" exists in original LLaVA only
    multimodal_projector_bias: bool = True
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it

    def __post_init__(self):
        if self.projector_type not in ("mlp2x_gelu", "linear"):
            raise ConfigError(f"projector_type {self.projector_type!r}: expected 'mlp2x_gelu' or 'linear'")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r}: "
                              "expected 'default' or 'full'")
        n = self.vision.num_hidden_layers
        for layer in self._feature_layer_list:
            if not -(n + 1) <= layer <= n:
                raise ConfigError(f"vision_feature_layer {layer} out of range for {n} vision layers")
        if self.text.num_attention_heads % self.text.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def _feature_layer_list(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Indices into the vision hidden-state tuple (0 = embeddings after pre_layrnorm), non-negative."""
        n = self.vision.num_hidden_layers + 1
        return tuple(layer % n for layer in self._feature_layer_list)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens one image contributes to the LLM sequence."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    # ---- presets -------------------------------------------------------------------------------------

    @classmethod
    def llava15_7b(cls) -> LlavaConfig:
        return cls()

    @classmethod
    def llava15_13b(cls) -> LlavaConfig:
        text = TextConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                          num_key_value_heads=40)
        return cls(text=text)

    @classmethod
    def tiny(cls, **overrides) -> LlavaConfig:
        """A few-kB model of the same shape as LLaVA-1.5 for tests and demos (4x4 patch grid)."""
        vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=16)
        text = TextConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          rms_norm_eps=1e-6)
        return dataclasses.replace(cls(vision=vision, text=text, image_token_index=150, image_seq_length=16),
                                   **overrides)

    # ---- our own serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlavaConfig:
        d = dict(d)
        vision = _strict(VisionConfig, d.pop("vision", {}), "vision")
        text = dict(d.pop("text", {}))
        if text.get("rope_scaling") is not None:
            text["rope_scaling"] = tuple(tuple(kv) for kv in text["rope_scaling"])
        text = _strict(TextConfig, text, "text")
        if isinstance(d.get("vision_feature_layer"), list):
            d["vision_feature_layer"] = tuple(d["vision_feature_layer"])
        return _strict(cls, {**d, "vision": vision, "text": text}, "llava")

    def save(self, path: str | Path) -> None:
        from atp_jax.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LlavaConfig:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a valid JSON file ({e})") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    # ---- HF config.json ----------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict) -> LlavaConfig:
        """Reads a llava-hf `config.json` dict; unknown or unsupported fields raise ConfigError."""
        d = dict(d)
        if d.get("model_type", "llava") != "llava":
            raise ConfigError(f"model_type {d['model_type']!r} is not a llava-hf config")
        vision = vision_from_hf_dict(d.pop("vision_config", None) or _HF_LLAVA_VISION)
        text = text_from_hf_dict(d.pop("text_config", None) or {})
        act = d.pop("projector_hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"projector_hidden_act {act!r}: only exact 'gelu' (LLaVA-1.5 mlp2x_gelu) is supported")
        tie = d.pop("tie_word_embeddings", text.tie_word_embeddings)
        text = dataclasses.replace(text, tie_word_embeddings=bool(tie or text.tie_word_embeddings))
        # transformers v4 wrote these at the top level: the loss's ignore index and the tokenizer's pad id
        # concern training and tokenisation only; vocab_size must agree with the decoder's.
        d.pop("ignore_index", None)
        d.pop("pad_token_id", None)
        vocab = d.pop("vocab_size", text.vocab_size)
        if vocab != text.vocab_size:
            raise ConfigError(f"vocab_size {vocab} disagrees with text_config.vocab_size {text.vocab_size}")
        if "image_token_id" in d:
            d["image_token_index"] = d.pop("image_token_id")
        if isinstance(d.get("vision_feature_layer"), list):
            d["vision_feature_layer"] = tuple(d["vision_feature_layer"])
        fields = {k: d.pop(k) for k in ("image_token_index", "image_seq_length", "multimodal_projector_bias",
                                        "vision_feature_layer", "vision_feature_select_strategy") if k in d}
        _reject_unknown(d, "llava config")
        return cls(vision=vision, text=text, **fields)

    def to_hf_dict(self) -> dict:
        """The llava-hf `config.json` dict that transformers' `LlavaConfig` reads back to this config."""
        if self.projector_type != "mlp2x_gelu":
            raise ConfigError("the llava-hf layout has no 'linear' projector; only mlp2x_gelu models can be exported")
        v, t = self.vision, self.text
        rope = {"rope_type": t.rope_type, "rope_theta": t.rope_theta, **dict(t.rope_scaling or ())}
        layer = self.vision_feature_layer
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.image_token_index,
            "image_seq_length": self.image_seq_length,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "projector_hidden_act": "gelu",
            "tie_word_embeddings": t.tie_word_embeddings,
            "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "num_channels": 3,
                              **dataclasses.asdict(v)},
            "text_config": {
                "model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                **{k: val for k, val in dataclasses.asdict(t).items() if k not in ("rope_theta", "rope_scaling")},
                "head_dim": t.head_dim, "rope_parameters": rope,
            },
        }


def vision_from_hf_dict(d: dict) -> VisionConfig:
    """A `CLIPVisionConfig` dict; fields it leaves out take transformers' defaults."""
    d = {**_HF_VISION_DEFAULTS, **d}
    if d.pop("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise ConfigError("vision_config is not a CLIP vision config")
    _check_fixed(d, "vision_config", hidden_act="quick_gelu", num_channels=3)
    d.pop("vocab_size", None)  # llava-hf 1.5 configs carry a stray CLIP text field here
    return _strict(VisionConfig, _drop_ignored(d), "vision_config")


def text_from_hf_dict(d: dict) -> TextConfig:
    """A `LlamaConfig` dict; fields it leaves out take transformers' defaults."""
    d = {**_HF_TEXT_DEFAULTS, **d}
    if d.pop("model_type", "llama") != "llama":
        raise ConfigError("text_config is not a LLaMA config")
    _check_fixed(d, "text_config", hidden_act="silu", attention_bias=False, mlp_bias=False, pretraining_tp=1)
    d["num_key_value_heads"] = d.get("num_key_value_heads") or d["num_attention_heads"]
    rope = dict(d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {})
    d.pop("rope_scaling", None)
    theta = rope.pop("rope_theta", d.pop("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in ("default", "linear", "dynamic", "llama3", "yarn"):
        raise ConfigError(f"rope type {rope_type!r} is not supported (default, linear, dynamic, llama3, yarn)")
    scaling = None if rope_type == "default" else tuple(sorted({"rope_type": rope_type, **rope}.items()))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(d.get(key), list):
            raise ConfigError(f"text_config.{key} as a list is not supported")
    return _strict(TextConfig, {**_drop_ignored(d), "rope_theta": float(theta), "rope_scaling": scaling},
                   "text_config")


def _check_fixed(d: dict, where: str, **required) -> None:
    """Pops fields we implement at one value only; any other value is an error."""
    for key, want in required.items():
        got = d.pop(key, want)
        if got != want:
            raise ConfigError(f"{where}.{key}={got!r} is not supported (only {want!r})")


def _drop_ignored(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _HF_IGNORED}


def _reject_unknown(d: dict, where: str) -> None:
    unknown = sorted(k for k in d if k not in _HF_IGNORED)
    if unknown:
        raise ConfigError(f"{where}: unknown or unsupported fields {unknown}")


# Fields that must be at least 1 (sizes and counts) or above 0 (epsilons, the RoPE base, the pruning
# temperature); the image token's index is >= 0 (token ids may be -1 in older LLaMA configs). Checked on every
# config read: ours, transformers' and the saved pruning config.
_POSITIVE_INTS = frozenset({"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "image_size",
                            "patch_size", "projection_dim", "image_seq_length", "mlp_width", "sorted_len"})
_POSITIVE_FLOATS = frozenset({"layer_norm_eps", "rms_norm_eps", "rope_theta", "temperature"})
_NON_NEGATIVE_INTS = frozenset({"image_token_index"})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _expected(name: str, hint) -> str | None:
    """What a field's value must be, as words; None when the hint is not one of the simple kinds checked here
    (nested configs, `rope_scaling`)."""
    base = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
    words = []
    for part in str(hint).replace(" ", "").split("|"):
        if part in base:
            words.append(base[part])
        elif part == "None":
            words.append("null")
        elif part == "tuple[int,...]":
            words.append("a list of integers")
        elif part == "tuple[float,...]":
            words.append("a list of numbers")
        else:
            return None
    if name in _POSITIVE_INTS:
        words = ["an integer >= 1" if w == "an integer" else w for w in words]
    elif name in _NON_NEGATIVE_INTS:
        words = ["an integer >= 0" if w == "an integer" else w for w in words]
    elif name in _POSITIVE_FLOATS:
        words = ["a number > 0" if w == "a number" else w for w in words]
    return " or ".join(words)


def _fits(name: str, value, hint) -> bool:
    for part in str(hint).replace(" ", "").split("|"):
        if part == "None" and value is None:
            return True
        if part == "bool" and isinstance(value, bool):
            return True
        if part == "str" and isinstance(value, str):
            return True
        if part == "int" and _is_int(value):
            low = 1 if name in _POSITIVE_INTS else 0 if name in _NON_NEGATIVE_INTS else None
            return low is None or value >= low
        if part == "float" and (_is_int(value) or isinstance(value, float)):
            return value == value and abs(value) != float("inf") and (name not in _POSITIVE_FLOATS or value > 0)
        if part == "tuple[int,...]" and isinstance(value, list | tuple) and all(map(_is_int, value)):
            return True
        if part == "tuple[float,...]" and isinstance(value, list | tuple) and all(
                (_is_int(v) or isinstance(v, float)) and v == v for v in value):
            return True
    return False


def check_types(cls, d: dict, where: str) -> None:
    """ConfigError naming the field, its value and what it must be, for a value of the wrong type or range."""
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        expected = _expected(f.name, f.type)
        if expected is not None and not _fits(f.name, d[f.name], f.type):
            raise ConfigError(f"{where}.{f.name} = {d[f.name]!r}: expected {expected}")


def _strict(cls, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    _reject_unknown({k: v for k, v in d.items() if k not in names}, where)
    check_types(cls, d, where)
    return cls(**{k: v for k, v in d.items() if k in names})
