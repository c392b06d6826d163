"""Tensor sources: safetensors and PyTorch `.bin` checkpoints (single or sharded), read one tensor at a time."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or keys at fault."""


class TensorSource:
    """Keys, shapes and lazily read tensors of one checkpoint, file by file (so memory stays at one tensor)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            for key, shape in self._index(f).items():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._where[key].name} and {f.name}")
                self._where[key], self._shapes[key] = f, shape

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def items(self, keys: set[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(key, array) for every tensor (or those in `keys`), file by file, one tensor in memory at a time."""
        for f in self.files:
            wanted = [k for k, where in self._where.items() if where == f and (keys is None or k in keys)]
            if wanted:
                yield from self._read(f, wanted)

    def _index(self, f: Path) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _read(self, f: Path, keys: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    def _index(self, f):
        from safetensors import safe_open

        try:
            with safe_open(f, framework="numpy") as h:
                return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
        except Exception as e:  # the library raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e

    def _read(self, f, keys):
        from safetensors import safe_open

        try:
            for k in keys:
                # A fresh (memory-mapped) handle per tensor: closing it unmaps the pages just read, so
                # resident memory holds one tensor of the file at a time, not all of it.
                with safe_open(f, framework="numpy") as h:
                    yield k, h.get_tensor(k)
        except Exception as e:
            raise CheckpointError(f"{f}: failed to read tensor data ({e})") from e


class TorchBinSource(TensorSource):
    """PyTorch pickles, loaded with `weights_only=True` (never executes code) and memory-mapped."""

    def __init__(self, files):
        self._loaded: dict[Path, dict] = {}
        super().__init__(files)

    def _load(self, f):
        if f not in self._loaded:
            import torch

            try:
                with warnings.catch_warnings():  # torch warns about pickle protocols before refusing them
                    warnings.simplefilter("ignore")
                    try:
                        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError as e:  # pre-zipfile pickles cannot be memory-mapped
                        if "mmap" not in str(e):
                            raise
                        sd = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
                raise CheckpointError(f"{f}: refused to load: it holds something other than tensors "
                                      f"(read with weights_only=True, which never runs pickled code): {detail}") from e
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: holds a {type(sd).__name__}, expected a dict of tensors")
            bad = {str(k): type(v).__name__ for k, v in sd.items() if not isinstance(k, str) or not torch.is_tensor(v)}
            if bad:
                raise CheckpointError(f"{f}: entries that are not tensors: {bad}")
            self._loaded = {f: sd}  # keep one file mapped at a time
        return self._loaded[f]

    def _index(self, f):
        return {k: tuple(v.shape) for k, v in self._load(f).items()}

    def _read(self, f, keys):
        sd = self._load(f)
        for k in keys:
            yield k, torch_to_numpy(sd[k])


def torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def open_checkpoint(directory: str | Path) -> TensorSource:
    """The tensors of an HF-style checkpoint directory: a sharded index if present, else every weight file.

    safetensors is preferred over `.bin` when a directory holds both.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    for suffix, cls in ((".safetensors", SafetensorsSource), (".bin", TorchBinSource)):
        indexes = sorted(d.glob(f"*{suffix}.index.json"))
        if indexes:
            files, weight_map = _read_index(indexes[0])
            source = cls(files)
            _check_index(indexes[0], weight_map, source)
            return source
        files = sorted(d.glob(f"*{suffix}"))
        if files:
            return cls(files)
    raise CheckpointError(f"{d}: no *.safetensors or *.bin weight files")


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
    files = sorted({index.parent / name for name in weight_map.values()})
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index}: names shard files that do not exist: {missing}")
    return files, weight_map


def _check_index(index: Path, weight_map: dict[str, str], source: TensorSource) -> None:
    """The index and the shards must agree key for key."""
    listed, present = set(weight_map), set(source.keys())
    if listed != present:
        raise CheckpointError(f"{index}: index and shards disagree; listed but absent: "
                              f"{sorted(listed - present)[:10]}, present but unlisted: {sorted(present - listed)[:10]}")
