"""HF/PyTorch LLaVA checkpoints -> our parameters, streamed tensor by tensor into preallocated arrays."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from atp_jax.convert import keys as K
from atp_jax.convert.configs import checkpoint_config, clip_vision_config, read_json
from atp_jax.convert.readers import CheckpointError, TensorSource, open_checkpoint
from atp_jax.models.common import DtypePolicy
from atp_jax.models.config import LlavaConfig, text_from_hf_dict
from atp_jax.models.llava import LlavaForConditionalGeneration
from atp_jax.models.projector import Projector
from atp_jax.nested import flatten

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
    cfg, _ = checkpoint_config(src, vision_src)
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
    out = fill(parts, assignments, targets, progress)
    n = sum(v.size for v in out.values())
    summary = ImportSummary(layout, len(assignments), skipped, n, sum(v.nbytes for v in out.values()),
                            jax.numpy.dtype(param_dtype).name)
    return cfg, out, summary


def fill(parts: list[Part], assignments: list[Assignment], targets: dict, progress: bool) -> dict[str, jax.Array]:
    """Every target allocated once and filled tensor by tensor from its sources, then moved into JAX buffers."""
    out = {path: np.empty(t.shape, t.dtype) for path, t in targets.items()}
    bar = tqdm(total=len(assignments), desc="converting", unit="tensor", disable=not progress)
    for source, _, _ in parts:
        mine = {a.src: a for a in assignments if a.source is source}
        for key, array in source.items(set(mine)):
            a = mine[key]
            value = K.to_ours(a.kind, array)
            if a.layer is None:
                out[a.dst][...] = value
            else:
                out[a.dst][a.layer] = value
            bar.update()
    bar.close()
    for path in list(out):  # into JAX-owned buffers one leaf at a time: the peak stays the model plus one leaf
        out[path] = jax.device_put(out[path], may_alias=False).block_until_ready()
    return out


def assemble(llm_src: str | Path, vision_src: str | Path, projector_type: str = "mlp2x_gelu",
             param_dtype="float32", seed: int = 0, progress: bool = False
             ) -> tuple[LlavaConfig, dict[str, jax.Array], ImportSummary]:
    """A LLaVA to start stage 1 from, as LLaVA-1.5 does: the LLM from a LLaMA/Vicuna checkpoint
    (`LlamaForCausalLM` layout), the vision tower from a CLIP checkpoint, the projector freshly initialised
    (`seed`). `<image>` takes the first id past the LLM's vocabulary, as for original LLaVA checkpoints."""
    llm_src, vision_src = Path(llm_src), Path(vision_src)
    d = read_json(llm_src / "config.json")
    if d.get("model_type") != "llama":
        raise CheckpointError(f"{llm_src}: model_type {d.get('model_type')!r}, expected a LLaMA/Vicuna checkpoint")
    vision = clip_vision_config(vision_src)
    text = text_from_hf_dict(d)
    cfg = LlavaConfig(vision=vision, text=text, image_token_index=text.vocab_size,
                      image_seq_length=vision.num_patches, projector_type=projector_type)
    llm_rules = [(r"model\.", r) for r in K.LLM]
    llm_rules += [] if text.tie_word_embeddings else [(r"lm_head\.", r) for r in K.HEAD]
    parts = [(open_checkpoint(llm_src), K.compile_rules(llm_rules), K.BUFFERS),
             (open_checkpoint(vision_src), K.compile_rules([(K.CLIP_VISION_PREFIX, r) for r in K.VISION]),
              K.BUFFERS + K.CLIP_NON_VISION)]
    dtype = jax.numpy.dtype(param_dtype)
    targets = {p: t for p, t in target_shapes(cfg, dtype).items() if not p.startswith("multi_modal_projector.")}
    assignments, skipped = plan(parts, targets)
    out = fill(parts, assignments, targets, progress)
    projector = Projector(cfg, DtypePolicy(dtype, dtype), nnx.Rngs(seed))
    out |= {f"multi_modal_projector.{k}": v for k, v in flatten(nnx.to_pure_dict(nnx.state(projector))).items()}
    n = sum(v.size for v in out.values())
    summary = ImportSummary("llama+clip", len(assignments), skipped, n, sum(v.nbytes for v in out.values()), dtype.name)
    return cfg, out, summary
