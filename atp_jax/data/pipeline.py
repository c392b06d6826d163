"""The grain input pipeline: records -> (image, tokens, labels) examples -> fixed-shape batches, resumable.

Each process reads a disjoint shard of a seeded global shuffle, pre-processes with `Preprocess` (images,
conversation template, tokenization, labels), drops the samples that cannot be used (counted per reason),
and batches to one fixed shape: every sequence padded to `max_length`, or, on a single process, to the
smallest of `length_buckets` that holds the batch. The iterator's position is saved and restored with orbax
(`grain.checkpoint.CheckpointSave/Restore` inside a `CheckpointManager`), so a resumed run sees the batches
it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from atp_jax.data.builders import decode_record
from atp_jax.data.conversation import IGNORE_INDEX, SampleError, encode_sample
from atp_jax.data.images import ImageError, load_image, preprocess
from atp_jax.data.sources import SkipReport
from atp_jax.data.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    template: str = "vicuna_v1"  # or "plain" (stage-1 captions)
    image_size: int = 336
    image_mode: str = "pad"  # LLaVA-1.5 trained with "pad"; "crop" is CLIPImageProcessor's
    max_length: int = 2048  # tokens, the image expanded
    length_buckets: tuple[int, ...] = ()  # single process only: pad each batch to the smallest bucket that fits
    strict: bool = False  # raise on the first unusable sample instead of skipping it


class Preprocess(grain.transforms.Map):
    """A decoded record -> one example of fixed length `max_length`, or a marked skip (dropped by `Usable`).

    Example fields: input_ids int32[L] (padding: the pad id), labels int32[L] (IGNORE_INDEX on padding),
    attention_mask bool[L], pixel_values float32[3, S, S] (zeros for text-only samples), has_image bool,
    length int32 (real tokens), skip str ("" when usable). Skips are counted in `self.report` of the process
    that ran the map (the main process with `worker_count=0`; workers log theirs).
    """

    def __init__(self, tokenizer_dir: str, image_token_id: int, num_image_tokens: int, config: DataConfig):
        self.tokenizer_dir, self.image_token_id, self.num_image_tokens = tokenizer_dir, image_token_id, num_image_tokens
        self.config = config
        self.report = SkipReport(strict=config.strict)

    @functools.cached_property
    def tokenizer(self):  # loaded where the map runs: each grain worker process loads its own
        return load_tokenizer(self.tokenizer_dir)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "tokenizer"}

    def map(self, record: dict) -> dict:
        cfg = self.config
        if "conversations" in record and isinstance(record["conversations"], (str, bytes)):
            record = decode_record(record)
        try:
            pixels = np.zeros((3, cfg.image_size, cfg.image_size), np.float32)
            if record["image"] is not None:
                try:
                    pixels = preprocess(load_image(record["image"]), cfg.image_size, cfg.image_mode)
                except ImageError as e:
                    raise SampleError("bad_image", str(e)) from e
            tokens = encode_sample(record["conversations"], self.tokenizer, cfg.template, record["image"] is not None,
                                   self.image_token_id, self.num_image_tokens, cfg.max_length)
        except SampleError as e:
            self.report.skip(record["id"], e)
            return skipped(cfg, e.reason)
        n = len(tokens.input_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return {"input_ids": _pad(tokens.input_ids, cfg.max_length, pad),
                "labels": _pad(tokens.labels, cfg.max_length, IGNORE_INDEX),
                "attention_mask": np.arange(cfg.max_length) < n, "pixel_values": pixels,
                "has_image": np.bool_(record["image"] is not None), "length": np.int32(n), "skip": ""}


def _pad(x: np.ndarray, length: int, value: int) -> np.ndarray:
    return np.concatenate([x, np.full(length - len(x), value, np.int32)]).astype(np.int32)


def skipped(cfg: DataConfig, reason: str) -> dict:
    length, size = cfg.max_length, cfg.image_size
    return {"input_ids": np.zeros(length, np.int32), "labels": np.full(length, IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros(length, bool), "pixel_values": np.zeros((3, size, size), np.float32),
            "has_image": np.bool_(False), "length": np.int32(0), "skip": reason}


class Usable(grain.transforms.Filter):
    """Drops the examples `Preprocess` marked as skipped."""

    def filter(self, example: dict) -> bool:
        return not example["skip"]


class TrimToBucket(grain.transforms.Map):
    """Cuts a batch's sequences to the smallest bucket that holds its longest real sequence."""

    def __init__(self, buckets: tuple[int, ...]):
        self.buckets = tuple(sorted(buckets))

    def map(self, batch: dict) -> dict:
        longest = int(batch["length"].max())
        length = next(b for b in self.buckets if b >= longest)
        return {k: v[:, :length] if k in ("input_ids", "labels", "attention_mask") else v for k, v in batch.items()}


class BatchSliceSampler:
    """Process `index` of `count` reads its slice of every global batch of one shared shuffle: global batch b is
    positions [b G, (b + 1) G) of the shuffled order (G = count x local batch), and this process takes its
    `local` rows of each. So N processes see exactly the global batches one process would (grain's own
    ShardOptions give each process a contiguous block of the dataset instead)."""

    def __init__(self, base, local: int, index: int, count: int):
        self.base, self.local, self.index, self.count = base, local, index, count

    def __len__(self) -> int:
        return len(self.base) // (self.local * self.count) * self.local

    def __getitem__(self, i: int):
        if i >= len(self):
            raise IndexError(f"index {i} past the end ({len(self)})")
        batch, row = divmod(i, self.local)
        record = self.base[(batch * self.count + self.index) * self.local + row]
        return dataclasses.replace(record, index=i)


def make_loader(source, preprocess_fn: Preprocess, batch_size: int, *, seed: int = 0, shard_index: int = 0,
                shard_count: int = 1, num_epochs: int | None = None, worker_count: int = 0,
                shuffle: bool = True) -> grain.DataLoader:
    """A grain DataLoader over a random-access `source` (e.g. `tfds.data_source(...)`): seeded shuffle over the
    whole dataset, this process's rows of each global batch (`shard_index` of `shard_count`, e.g.
    jax.process_index/count; see `BatchSliceSampler`),
    pre-processing, skips dropped, batches of `batch_size` examples (the per-process batch; incomplete last
    batches dropped). `num_epochs=None` repeats forever."""
    cfg = preprocess_fn.config
    if cfg.length_buckets:
        if shard_count > 1:
            raise ValueError("length_buckets would give processes different batch shapes; use max_length alone")
        if max(cfg.length_buckets) != cfg.max_length:
            raise ValueError(f"the largest length bucket must be max_length ({cfg.max_length}): {cfg.length_buckets}")
    sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=shuffle, seed=seed, num_epochs=num_epochs)
    if shard_count > 1:
        sampler = BatchSliceSampler(sampler, batch_size, shard_index, shard_count)
    operations = [preprocess_fn, Usable(), grain.transforms.Batch(batch_size=batch_size, drop_remainder=True)]
    if cfg.length_buckets:
        operations.append(TrimToBucket(cfg.length_buckets))
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations, worker_count=worker_count,
                            shard_options=grain.sharding.NoSharding())  # the sampler already holds this process's rows


