"""HF/PyTorch LLaVA checkpoints -> our parameters, streamed tensor by tensor into preallocated arrays."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from atp_jax.convert import keys as K
from atp_jax.convert.readers import CheckpointError, TensorSource, open_checkpoint
from atp_jax.models.common import DtypePolicy
from atp_jax.models.config import ConfigError, LlavaConfig, VisionConfig, text_from_hf_dict, vision_from_hf_dict
from atp_jax.models.llava import LlavaForConditionalGeneration

# Original-LLaVA config fields about training or tokenisation that do not change the network.
_ORIGINAL_TRAINING_FIELDS = frozenset({
    "mm_vision_tower", "mm_hidden_size", "image_aspect_ratio", "image_grid_pinpoints", "mm_patch_merge_type",
    "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "mm_projector_lr", "tune_mm_vision_tower",
    "unfreeze_mm_vision_tower", "use_mm_proj", "mm_vision_tower_lr", "tokenizer_model_max_length",
    "tokenizer_padding_side", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_projector_type", "freeze_backbone",
})
_CLIP_L14_336 = "clip-vit-large-patch14-336"


# One checkpoint to read: its tensors, compiled rules [(regex, Rule, prefix)], and key patterns it may skip.
Part = tuple[TensorSource, list, tuple[str, ...]]


@dataclasses.dataclass
class Assignment:
    src: str
    dst: str
    layer: int | None
    kind: str
    source: TensorSource


@dataclasses.dataclass
class ImportSummary:
    layout: str
    tensors: int
    skipped: list[str]
    parameters: int
    bytes: int
    dtype: str

    def __str__(self):
        return (f"layout {self.layout}: {self.tensors} tensors -> {self.parameters:,} parameters "
                f"({self.bytes / 2**20:.1f} MiB, {self.dtype}); {len(self.skipped)} buffers/unused tensors skipped")


# ---- configuration -------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def is_original_config(d: dict) -> bool:
    return "mm_projector_type" in d or d.get("model_type") in ("llava_llama", "llava_mistral")


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


# ---- planning --------------------------------------------------------------------------------------------------


def target_shapes(cfg: LlavaConfig, param_dtype) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat `path -> ShapeDtypeStruct` of every parameter, computed without allocating."""
    policy = DtypePolicy(param_dtype, param_dtype)
    model = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, policy=policy, rngs=nnx.Rngs(0)))
    return flatten(nnx.to_pure_dict(nnx.state(model)))


def plan(parts: list[Part], targets: dict[str, jax.ShapeDtypeStruct]) -> tuple[list[Assignment], list[str]]:
    """Matches every source key to exactly one parameter slot; all problems reported in one error."""
    assignments, skipped, unknown, problems = [], [], [], []
    filled: dict[tuple[str, int | None], str] = {}
    for source, rules, ignore in parts:
        for key in source.keys():
            hit = next(((m, r) for pattern, r, _ in rules if (m := pattern.fullmatch(key))), None)
            if hit is None:
                (skipped if any(re.fullmatch(p, key) for p in ignore) else unknown).append(key)
                continue
            m, rule = hit
            layer = int(m.group("i")) if rule.stacked else None
            target = targets.get(rule.dst)
            if target is None:  # e.g. lm_head in a tied model
                unknown.append(key)
                continue
            slot = target.shape[1:] if rule.stacked else target.shape
            if rule.stacked and layer >= target.shape[0]:
                problems.append(f"{key}: layer {layer} but the config has {target.shape[0]} layers")
                continue
            shape = K.our_shape(rule.kind, source.shape(key))
            if shape != slot:
                problems.append(f"{key}: shape {list(source.shape(key))} does not fit {rule.dst} {list(slot)}")
                filled[(rule.dst, layer)] = key
                continue
            if (rule.dst, layer) in filled:
                problems.append(f"{key}: {rule.dst}[{layer}] already filled by {filled[(rule.dst, layer)]}")
                continue
            filled[(rule.dst, layer)] = key
            assignments.append(Assignment(key, rule.dst, layer, rule.kind, source))
    missing = []
    rule_of = {r.dst: (prefix, r) for _, rules, _ in parts for _, r, prefix in rules}
    for path, t in targets.items():
        prefix, rule = rule_of[path]
        for layer in (range(t.shape[0]) if rule.stacked else [None]):
            if (path, layer) not in filled:
                missing.append(K.export_name(prefix, rule, layer))
    if unknown:
        problems.append(f"unexpected tensors (no parameter takes them): {unknown}")
    if missing:
        problems.append(f"parameters no tensor fills (missing tensors): {missing}")
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return assignments, skipped


# ---- conversion --------------------------------------------------------------------------------------------------


def read_hf(src: str | Path, vision_src: str | Path | None = None) -> tuple[LlavaConfig, str, list[Part]]:
    """Config and (source, compiled rules, ignorable patterns) parts for an HF or original LLaVA directory."""
    src = Path(src)
    d = read_json(src / "config.json")
    vision_cfg = clip_vision_config(Path(vision_src)) if vision_src else None
    try:
        cfg = original_config(d, vision_cfg) if is_original_config(d) else LlavaConfig.from_hf_dict(d)
    except (ConfigError, TypeError, AttributeError, KeyError, ValueError) as e:  # also fields of the wrong kind
        raise ConfigError(f"{src / 'config.json'}: {e}") from e
    if vision_cfg is not None and vision_cfg != cfg.vision:
        raise ConfigError(f"--vision-src CLIP config {vision_cfg} differs from the checkpoint's {cfg.vision}")
    source = open_checkpoint(src)
    layout = K.detect_layout(source.keys(), cfg.projector_type)
    embedded_vision = any(re.match(layout.vision, k) and not any(re.fullmatch(p, k) for p in K.BUFFERS)
                          for k in source.keys())
    head = not cfg.text.tie_word_embeddings
    if embedded_vision:  # --vision-src, if given, only supplied the CLIP config
        return cfg, layout.name, [(source, K.compile_rules(layout.rules(include_head=head)), K.BUFFERS)]
    if vision_src is None:
        raise CheckpointError(f"{src} holds no vision tower weights; pass the CLIP directory with --vision-src")
    parts = [(source, K.compile_rules(layout.rules(include_vision=False, include_head=head)), K.BUFFERS),
             (open_checkpoint(vision_src), K.compile_rules([(K.CLIP_VISION_PREFIX, r) for r in K.VISION]),
              K.BUFFERS + K.CLIP_NON_VISION)]
    return cfg, layout.name, parts


def convert_hf(src: str | Path, param_dtype="float32", vision_src: str | Path | None = None,
               progress: bool = False) -> tuple[LlavaConfig, dict[str, jax.Array], ImportSummary]:
    """Reads an HF/original LLaVA checkpoint into flat parameters (host arrays) of dtype `param_dtype`.

    Peak host memory is the output plus one tensor: every parameter is allocated once and filled in place.
    """
    cfg, layout, parts = read_hf(src, vision_src)
    targets = target_shapes(cfg, jax.numpy.dtype(param_dtype))
    assignments, skipped = plan(parts, targets)
    out = {path: np.empty(t.shape, t.dtype) for path, t in targets.items()}
    by_key = {(id(a.source), a.src): a for a in assignments}
    bar = tqdm(total=len(assignments), desc="converting", unit="tensor", disable=not progress)
    for source, _, _ in parts:
        for key, array in source.items():
            a = by_key.get((id(source), key))
            if a is None:
                continue
            value = K.to_ours(a.kind, array)
            if a.layer is None:
                out[a.dst][...] = value
            else:
                out[a.dst][a.layer] = value
            bar.update()
    bar.close()
    for path in list(out):  # into JAX-owned buffers one leaf at a time: the peak stays the model plus one leaf
        out[path] = jax.device_put(out[path], may_alias=False).block_until_ready()
    n = sum(v.size for v in out.values())
    summary = ImportSummary(layout, len(assignments), skipped, n, sum(v.nbytes for v in out.values()),
                            jax.numpy.dtype(param_dtype).name)
    return cfg, out, summary


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out.update(flatten(v, path + ".") if isinstance(v, dict) else {path: v})
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
