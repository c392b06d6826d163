"""Our parameters -> a llava-hf checkpoint (safetensors + config.json) that transformers loads as is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from atp_jax.convert import keys as K
from atp_jax.convert.checkpoint import copy_sidecars
from atp_jax.fileio import staged_directory
from atp_jax.models.config import LlavaConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def hf_tensors(cfg: LlavaConfig, flat: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(llava-hf key, torch-layout array) for every tensor, in table order; arrays are made one at a time."""
    layout = K.LLAVA_HF
    for prefix, rule in layout.rules(include_head=not cfg.text.tie_word_embeddings):
        value = np.asarray(flat[rule.dst])
        if rule.stacked:
            for i in range(value.shape[0]):
                yield K.export_name(prefix, rule, i), K.to_source(rule.kind, value[i])
        else:
            yield K.export_name(prefix, rule), K.to_source(rule.kind, value)


def count_tensors(cfg: LlavaConfig) -> int:
    layers = {"vision_tower.": cfg.vision.num_hidden_layers, "language_model.": cfg.text.num_hidden_layers}
    rules = K.LLAVA_HF.rules(include_head=not cfg.text.tie_word_embeddings)
    return sum(next(n for p, n in layers.items() if r.dst.startswith(p)) if r.stacked else 1 for _, r in rules)


def write_hf(dst: str | Path, cfg: LlavaConfig, flat: dict[str, np.ndarray], *, sidecars_from: Path | None = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False, progress: bool = False) -> int:
    """Writes safetensors shards (and an index when more than one) plus config.json, atomically.

    Peak memory beyond `flat` is one shard. Returns the number of tensors written.
    """
    from safetensors.numpy import save_file

    hf_config = cfg.to_hf_dict()  # raises before anything is written if the model has no llava-hf form
    dtype = np.dtype(next(iter(flat.values())).dtype).name
    written, shards, shard, shard_bytes = 0, [], {}, 0
    with staged_directory(dst, overwrite) as tmp:
        def flush():
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            shards.append((name, list(shard)))

        for key, value in tqdm(hf_tensors(cfg, flat), total=count_tensors(cfg), desc="exporting", unit="tensor",
                               disable=not progress):
            if shard and shard_bytes + value.nbytes > max_shard_bytes:
                flush()
                shard, shard_bytes = {}, 0
            shard[key], shard_bytes = value, shard_bytes + value.nbytes
            written += 1
        flush()
        if len(shards) == 1:
            (tmp / shards[0][0]).rename(tmp / "model.safetensors")
        else:
            total = len(shards)
            weight_map = {}
            for n, (name, keys) in enumerate(shards, 1):
                final = f"model-{n:05d}-of-{total:05d}.safetensors"
                (tmp / name).rename(tmp / final)
                weight_map.update({k: final for k in keys})
            size = sum(np.asarray(v).nbytes for v in flat.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps({**hf_config, "dtype": dtype}, indent=2) + "\n")
        if sidecars_from is not None:
            copy_sidecars(sidecars_from, tmp)
    return written
