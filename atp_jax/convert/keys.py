"""Checkpoint key tables: which source tensor fills which parameter of ours, and how it is transformed.

Conversion is data. A `Rule` names a tensor relative to its component (vision tower, projector, LLM body,
LM head), the path of our parameter (in `nnx.to_pure_dict(nnx.state(model))`), and a transform kind. `{i}`
is a layer index: our layer parameters are stacked, so layer i fills row i. A `Layout` says where each
component lives in a checkpoint's key space. The same tables drive import (regex match) and export
(template formatting), so the two directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# ---- transforms: axis permutations from the source layout to ours (export applies the inverse) ----------------

TRANSFORMS = {
    "copy": None,
    "linear": (1, 0),  # torch Linear [out, in] -> our kernel [in, out]
    "conv": (2, 3, 1, 0),  # torch Conv2d OIHW -> HWIO
}


@dataclasses.dataclass(frozen=True)
class Rule:
    src: str  # relative to the component prefix; may contain {i}
    dst: str  # dotted path of our parameter; layer rules address the stacked leaf
    kind: str = "copy"

    @property
    def stacked(self) -> bool:
        return "{i}" in self.src


def _linear(src: str, dst: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}.kernel", "linear")]
    return rules + [Rule(f"{src}.bias", f"{dst}.bias")] if bias else rules


def _layer_norm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.scale"), Rule(f"{src}.bias", f"{dst}.bias")]


VISION = [
    Rule("embeddings.class_embedding", "vision_tower.class_embedding"),
    Rule("embeddings.patch_embedding.weight", "vision_tower.patch_embedding.kernel", "conv"),
    Rule("embeddings.position_embedding.weight", "vision_tower.position_embedding.embedding"),
    *_layer_norm("pre_layrnorm", "vision_tower.pre_layrnorm"),
    *_layer_norm("post_layernorm", "vision_tower.post_layernorm"),
    *[r for p in ("q_proj", "k_proj", "v_proj", "out_proj")
      for r in _linear(f"encoder.layers.{{i}}.self_attn.{p}", f"vision_tower.layers.self_attn.{p}")],
    *_layer_norm("encoder.layers.{i}.layer_norm1", "vision_tower.layers.layer_norm1"),
    *_layer_norm("encoder.layers.{i}.layer_norm2", "vision_tower.layers.layer_norm2"),
    *_linear("encoder.layers.{i}.mlp.fc1", "vision_tower.layers.fc1"),
    *_linear("encoder.layers.{i}.mlp.fc2", "vision_tower.layers.fc2"),
]

LLM = [
    Rule("embed_tokens.weight", "language_model.embed_tokens.embedding"),
    Rule("norm.weight", "language_model.norm.weight"),
    *[r for p in ("q_proj", "k_proj", "v_proj", "o_proj")
      for r in _linear(f"layers.{{i}}.self_attn.{p}", f"language_model.layers.self_attn.{p}", bias=False)],
    *[r for p in ("gate_proj", "up_proj", "down_proj")
      for r in _linear(f"layers.{{i}}.mlp.{p}", f"language_model.layers.mlp.{p}", bias=False)],
    Rule("layers.{i}.input_layernorm.weight", "language_model.layers.input_layernorm.weight"),
    Rule("layers.{i}.post_attention_layernorm.weight", "language_model.layers.post_attention_layernorm.weight"),
]

HEAD = [Rule("weight", "language_model.lm_head.kernel", "linear")]

PROJECTOR_HF = [*_linear("linear_1", "multi_modal_projector.linear_1"),
                *_linear("linear_2", "multi_modal_projector.linear_2")]
PROJECTOR_ORIGINAL_MLP = _linear("0", "multi_modal_projector.linear_1") + _linear("2", "multi_modal_projector.linear_2")
PROJECTOR_ORIGINAL_LINEAR = [Rule("weight", "multi_modal_projector.linear_1.kernel", "linear"),
                             Rule("bias", "multi_modal_projector.linear_1.bias")]

# Buffers some writers save that carry no parameters: consumed and dropped.
BUFFERS = (r".*\.position_ids", r".*rotary_emb\.inv_freq")
# The rest of a full CLIP checkpoint (text tower, projections) when CLIP weights come from one.
CLIP_NON_VISION = (r"text_model\..*", r"visual_projection\..*", r"text_projection\..*", r"logit_scale")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the components of LLaVA live in one checkpoint key space (prefixes are regexes)."""

    name: str
    vision: str
    projector: str
    llm: str
    head: str
    projector_rules: tuple[Rule, ...] = tuple(PROJECTOR_HF)

    def rules(self, include_vision: bool = True, include_head: bool = True) -> list[tuple[str, Rule]]:
        parts = [(self.projector, self.projector_rules), (self.llm, LLM)]
        parts += [(self.vision, VISION)] if include_vision else []
        parts += [(self.head, HEAD)] if include_head else []
        return [(prefix, rule) for prefix, rules in parts for rule in rules]


# What transformers writes to disk (v4 `vision_tower.vision_model.`, v5 `vision_tower.`); the first
# alternative of each prefix is the one export writes.
LLAVA_HF = Layout("llava-hf", r"vision_tower\.(?:vision_model\.)?", r"multi_modal_projector\.",
                  r"language_model\.model\.", r"language_model\.lm_head\.")
# transformers >= 4.52 in-memory names (what `state_dict()` returns).
LLAVA_HF_MEMORY = Layout("llava-hf-memory", r"model\.vision_tower\.(?:vision_model\.)?",
                         r"model\.multi_modal_projector\.", r"model\.language_model\.", r"lm_head\.")
# liuhaotian/llava-v1.5-*: LLaMA names at the top, projector as an nn.Sequential, CLIP embedded or separate.
ORIGINAL = Layout("original", r"model\.vision_tower\.vision_tower\.vision_model\.", r"model\.mm_projector\.",
                  r"model\.", r"lm_head\.", tuple(PROJECTOR_ORIGINAL_MLP))
ORIGINAL_LINEAR = dataclasses.replace(ORIGINAL, name="original-linear",
                                      projector_rules=tuple(PROJECTOR_ORIGINAL_LINEAR))
# The vision tower inside a separately given CLIP checkpoint (CLIPModel or CLIPVisionModel).
CLIP_VISION_PREFIX = r"vision_model\."


def detect_layout(keys: list[str], projector_type: str) -> Layout:
    """Which layout a set of keys is written in."""
    if any(k.startswith("multi_modal_projector.") for k in keys):
        return LLAVA_HF
    if any(k.startswith("model.multi_modal_projector.") for k in keys):
        return LLAVA_HF_MEMORY
    if any(k.startswith("model.mm_projector.") for k in keys):
        return ORIGINAL_LINEAR if projector_type == "linear" else ORIGINAL
    raise KeyError("no projector tensors found (multi_modal_projector.* or model.mm_projector.*): "
                   "not a LLaVA checkpoint")


def compile_rules(prefixed: list[tuple[str, Rule]]) -> list[tuple[re.Pattern, Rule, str]]:
    """(regex matching full source keys, rule, prefix); regex group `i` captures the layer index."""
    out = []
    for prefix, rule in prefixed:
        body = re.escape(rule.src).replace(r"\{i\}", r"(?P<i>\d+)")
        out.append((re.compile(prefix + body), rule, prefix))
    return out


def export_name(prefix_regex: str, rule: Rule, i: int | None = None) -> str:
    """The key export writes for a rule: the first alternative of the prefix, layer index filled in."""
    prefix = re.sub(r"\(\?:[^)]*\)\?", "", prefix_regex).replace("\\", "")
    return prefix + (rule.src.format(i=i) if rule.stacked else rule.src)


def to_ours(kind: str, x: np.ndarray) -> np.ndarray:
    """The source tensor in our layout (a view: the copy happens when it is written into place)."""
    perm = TRANSFORMS[kind]
    return x if perm is None else x.transpose(perm)


def our_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    perm = TRANSFORMS[kind]
    return tuple(shape) if perm is None or len(perm) != len(shape) else tuple(shape[i] for i in perm)


def to_source(kind: str, x: np.ndarray) -> np.ndarray:
    perm = TRANSFORMS[kind]
    return np.ascontiguousarray(x if perm is None else x.transpose(np.argsort(perm)))
