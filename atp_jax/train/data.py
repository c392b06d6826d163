"""The trainer's data: the configured TFDS source (the synthetic set is generated on first use) and loaders."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import tensorflow_datasets as tfds

from atp_jax.data import synthetic
from atp_jax.data.builders import shapes_data
from atp_jax.data.pipeline import DataConfig, Preprocess, make_loader
from atp_jax.data.tokenizer import load_tokenizer


@dataclasses.dataclass
class Data:
    tokenizer: object
    tokenizer_dir: Path
    sources: dict  # split role ("train", "eval") -> random-access source
    image_token_id: int


def cache_dir(config) -> Path:
    return Path(config.data.cache_dir or os.environ.get("ATP_JAX_CACHE") or Path.home() / ".cache" / "atp_jax")


def shapes_config(config) -> synthetic.ShapesConfig:
    """The synthetic set a config trains on: images at the model's input size, `data.shapes` fields replaced."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.data.get("shapes", {}).items()}
    return dataclasses.replace(synthetic.ShapesConfig(), image_size=config.model.vision.image_size,
                               train_size=config.data.shapes_train_size, **fields)


def shapes_kind(source: str) -> str:
    """The shapes_vqa builder config a source names: "shapes_vqa/caption" -> "caption"; bare "shapes_vqa" is TFDS'
    default, the first config ("vqa")."""
    name, _, kind = source.partition("/")
    kind = kind.split(":")[0] or synthetic.SAMPLE_KINDS[0]
    if name.split(":")[0] != "shapes_vqa" or kind not in synthetic.SAMPLE_KINDS:
        raise ValueError(f"data.source {source!r}: expected shapes_vqa/<config> with a config among "
                         f"{synthetic.SAMPLE_KINDS}")
    return kind


def prepare(config) -> Data:
    """Tokenizer and sources. The synthetic set is written by process 0 while the others wait, then read by all."""
    d = config.data
    if d.source.startswith("shapes_vqa"):
        shapes = shapes_config(config)
        kinds = (shapes_kind(d.source),)
        if jax.process_index() == 0:
            data_dir, tokenizer_dir = shapes_data(cache_dir(config), shapes, kinds=kinds)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("synthetic data ready")
            if jax.process_index() != 0:  # now only reads what process 0 wrote
                data_dir, tokenizer_dir = shapes_data(cache_dir(config), shapes, kinds=kinds)
    else:
        tokenizer_dir = d.tokenizer or config.model.init_from  # a converted checkpoint carries its tokenizer
        if not tokenizer_dir or not d.data_dir:
            raise ValueError(f"source {d.source!r} needs data.data_dir (its prepared TFDS directory) and a tokenizer "
                             "(data.tokenizer, or one beside model.init_from)")
        data_dir, tokenizer_dir = Path(d.data_dir), Path(tokenizer_dir)
        if not (data_dir / d.source).is_dir():  # tfds would try to build it, and fail on the missing manual_dir
            raise FileNotFoundError(f"no prepared dataset {d.source!r} in {data_dir}: run launch/prepare_data.py")
    sources = {"train": tfds.data_source(d.source, split=d.train_split, data_dir=str(data_dir))}
    if d.eval_split:
        sources["eval"] = tfds.data_source(d.source, split=d.eval_split, data_dir=str(data_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    return Data(tokenizer, Path(tokenizer_dir), sources, tokenizer.convert_tokens_to_ids("<image>"))


def loader(config, data: Data, source, model_cfg, batch_size: int, seed: int, shuffle: bool = True,
           num_epochs: int | None = None):
    """This process's batches of `batch_size` from `source`: its shard of a seeded global shuffle."""
    pre = Preprocess(str(data.tokenizer_dir), model_cfg.image_token_index, model_cfg.num_image_tokens,
                     DataConfig(template=config.data.template, image_size=model_cfg.vision.image_size,
                                image_mode=config.data.image_mode, max_length=config.data.max_length))
    return make_loader(source, pre, batch_size, seed=seed, shard_index=jax.process_index(),
                       shard_count=jax.process_count(), num_epochs=num_epochs, worker_count=config.data.worker_count,
                       shuffle=shuffle)
