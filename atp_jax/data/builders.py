"""TFDS builders (no TensorFlow: array_record files, read back with `tfds.data_source`).

Every dataset stores the same record: `id`, `image` (the encoded image file, b"" for text-only samples),
`conversations` (the LLaVA turns as JSON) and `kind` (question kind, "" when unknown). Samples that cannot be
used (bad schema, missing or corrupt image, inconsistent conversation) are skipped while preparing, counted
per reason and logged, so reading never meets them.

  llava_instruct   LLaVA-Instruct (e.g. llava_v1_5_mix665k.json) from a local manual_dir
  llava_pretrain   LLaVA-Pretrain captions (blip_laion_cc_sbu_558k.json) from a local manual_dir
  shapes_vqa       the built-in synthetic set (configs `vqa` and `caption`), generated
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from atp_jax.data import synthetic
from atp_jax.data.conversation import SampleError, normalise_turns, template_text
from atp_jax.data.images import ImageError, load_image
from atp_jax.data.sources import SkipReport, image_path, iter_entries

log = logging.getLogger(__name__)


def record_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes: tfds' Image needs TensorFlow
        "conversations": tfds.features.Text(),
        "kind": tfds.features.Text(),
    })


def decode_record(record: dict) -> dict:
    """A record read back from a data source, with text fields as str and turns as a list."""
    text = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items() if k != "image"}
    return {"id": text["id"], "image": bytes(record["image"]) or None,
            "conversations": json.loads(text["conversations"]), "kind": text.get("kind", "")}


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def llava_examples(annotation, image_root, report: SkipReport):
    """(key, record) pairs from a LLaVA annotation file, each image read and checked to decode."""
    for entry in iter_entries(annotation, report):
        try:
            normalise_turns(entry["conversations"], entry["image"] is not None)
            image = b""
            if entry["image"] is not None:
                path = image_path(image_root, entry["image"])
                try:
                    load_image(path)
                except ImageError as e:
                    raise SampleError("bad_image", str(e)) from e
                image = path.read_bytes()
        except SampleError as e:
            report.skip(entry["id"], e)
            continue
        yield entry["id"], {"id": entry["id"], "image": image, "conversations": json.dumps(entry["conversations"]),
                            "kind": ""}
    log.warning("%s: %s", annotation, report.summary())


@dataclasses.dataclass
class LlavaConfig(tfds.core.BuilderConfig):
    annotation: str = ""  # annotation file, relative to manual_dir
    image_dir: str = ""  # image root, relative to manual_dir


class LlavaInstruct(tfds.core.GeneratorBasedBuilder):
    """LLaVA-Instruct conversations from a local manual_dir (one `train` split)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [LlavaConfig(name="mix665k", annotation="llava_v1_5_mix665k.json", image_dir=".")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place llava_v1_5_mix665k.json (or another LLaVA-Instruct JSON/JSONL: choose "
                                    "it with a BuilderConfig) in manual_dir with the image folders it refers to "
                                    "(coco/, gqa/, ocr_vqa/, textvqa/, vg/) beside it.")

    def _info(self):
        return self.dataset_info_from_configs(features=record_features())

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        return {"train": self._generate_examples(root / self.builder_config.annotation,
                                                 root / self.builder_config.image_dir)}

    def _generate_examples(self, annotation, image_root):
        yield from llava_examples(annotation, image_root, SkipReport())


class LlavaPretrain(LlavaInstruct):
    """LLaVA-Pretrain image captions (`plain` template) from a local manual_dir (one `train` split)."""

    BUILDER_CONFIGS = [LlavaConfig(name="558k", annotation="blip_laion_cc_sbu_558k.json", image_dir="images")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place blip_laion_cc_sbu_558k.json in manual_dir and the images it refers to "
                                    "under manual_dir/images.")


class ShapesVqa(tfds.core.GeneratorBasedBuilder):
    """The built-in synthetic shapes set: `vqa` (one question per image), `multi` (multi-turn conversations about
    the same images) and `caption` (stage 1); train/val/test splits."""

    VERSION = tfds.core.Version("1.3.0")  # 1.1.0: count answers are number words; 1.2.0: the multi config;
    # 1.3.0: the place questions (in the tokenizer text)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=kind) for kind in synthetic.SAMPLE_KINDS]

    def __init__(self, *, shapes: synthetic.ShapesConfig | None = None, **kwargs):
        self.shapes = shapes or synthetic.ShapesConfig()
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(features=record_features())

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ("train", "val", "test")}

    def _generate_examples(self, split: str):
        kind = self.builder_config.name
        for sample in synthetic.generate(split, self.shapes, kind=kind):
            yield sample["id"], {"id": sample["id"], "image": png_bytes(sample["image"]),
                                 "conversations": json.dumps(sample["conversations"]),
                                 "kind": sample.get("kind", "caption")}


def shapes_data(cache_dir: str | os.PathLike, shapes: synthetic.ShapesConfig | None = None,
                tokenizer_vocab: int = 512, kinds: tuple[str, ...] = synthetic.SAMPLE_KINDS) -> tuple[Path, Path]:
    """The synthetic set prepared on first use: (TFDS data_dir, tokenizer directory) under `cache_dir`, in a
    folder named after a hash of the generator config, so another config never reads a stale cache. `kinds`
    names the builder configs to prepare (a training stage needs only its own). The tokenizer is a LLaMA-style
    sentencepiece model trained on every string the set can produce: the same for every config with the same
    vocabulary, so the stages of a chain that change, say, object sizes share one tokenizer."""
    from atp_jax.data.tokenizer import train_tokenizer

    unknown = set(kinds) - set(synthetic.SAMPLE_KINDS)
    if unknown:
        raise ValueError(f"unknown shapes_vqa configs {sorted(unknown)}; expected some of {synthetic.SAMPLE_KINDS}")
    shapes = shapes or synthetic.ShapesConfig()
    key = hashlib.sha256(repr((shapes, tokenizer_vocab, ShapesVqa.VERSION)).encode()).hexdigest()[:12]
    root = Path(cache_dir) / f"shapes-{key}"
    data_dir, tokenizer_dir = root / "tfds", root / "tokenizer"
    for config in kinds:
        ShapesVqa(shapes=shapes, config=config, data_dir=str(data_dir), file_format="array_record"
                  ).download_and_prepare()  # a no-op once prepared; tfds writes to a temporary dir first
    if not tokenizer_dir.exists():
        text = [*synthetic.all_text(shapes), *template_text()]
        train_tokenizer(text, tokenizer_dir, vocab_size=tokenizer_vocab)
    return data_dir, tokenizer_dir
