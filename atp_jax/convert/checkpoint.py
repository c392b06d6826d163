"""Our converted checkpoint directory (orbax parameters + config), written atomically, and `load_pretrained`.

Layout of a converted directory:
    atp_config.json   our LlavaConfig
    params/           orbax checkpoint of `nnx.to_pure_dict(nnx.state(model))`
    tokenizer files   copied from the source checkpoint when it has them
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from atp_jax.convert.readers import CheckpointError
from atp_jax.fileio import staged_directory
from atp_jax.models.common import DtypePolicy
from atp_jax.models.config import LlavaConfig
from atp_jax.models.llava import LlavaForConditionalGeneration

CONFIG_FILE = "atp_config.json"
PARAMS_DIR = "params"
# Files beside the weights that inference needs (tokenizer, processor, chat template).
SIDECAR_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                    "processor_config.json", "chat_template.*", "generation_config.json", "*.model")


def copy_sidecars(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in SIDECAR_PATTERNS:
        for f in src.glob(pattern):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return sorted(copied)


def save_converted(dst: str | Path, cfg: LlavaConfig, params: dict, sidecars_from: Path | None = None,
                   overwrite: bool = False) -> None:
    """Writes our checkpoint atomically. `params` is the nested pure dict of jax arrays.

    (Numpy leaves work too, but orbax then stages a full copy of them while writing.)
    """
    import orbax.checkpoint as ocp

    # Uncompressed: zstd would stage a second copy of the whole model (and weights barely compress).
    with staged_directory(dst, overwrite) as tmp:
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
        checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
        cfg.save(tmp / CONFIG_FILE)
        if sidecars_from is not None:
            copy_sidecars(sidecars_from, tmp)


def is_converted(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def check_complete(path: str | Path) -> None:
    """CheckpointError for a converted directory whose writer stopped before the end (parameters without the
    config file, which is written last)."""
    path = Path(path)
    if (path / PARAMS_DIR).exists() and not is_converted(path):
        raise CheckpointError(f"{path}: an incomplete checkpoint ({PARAMS_DIR}/ but no {CONFIG_FILE}, which is "
                              "written last): the run that wrote it stopped before the end; write it again")


def abstract_model(cfg: LlavaConfig, policy: DtypePolicy) -> LlavaForConditionalGeneration:
    """A model whose parameters are shapes only: nothing is allocated or initialised."""
    return nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, policy=policy, rngs=nnx.Rngs(0)))


def model_from_params(cfg: LlavaConfig, params: dict, policy: DtypePolicy) -> LlavaForConditionalGeneration:
    """Builds the model around given parameters (nested pure dict), cast to the policy's parameter dtype."""
    model = abstract_model(cfg, policy)
    state = nnx.state(model)
    params = jax.tree.map(lambda x: jnp.asarray(x, policy.param_dtype), params)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def read_converted(path: str | Path, param_dtype=None) -> tuple[LlavaConfig, dict]:
    """Config and nested numpy parameters of a converted directory (cast to `param_dtype` if given)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not is_converted(path):
        raise CheckpointError(f"{path}: not a converted atp_jax directory (no {CONFIG_FILE})")
    try:
        cfg = LlavaConfig.load(path / CONFIG_FILE)
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON, or fields of the wrong kind
        raise CheckpointError(f"{path / CONFIG_FILE}: not a valid atp_jax config ({e!r})") from e
    checkpointer = ocp.StandardCheckpointer()
    try:
        meta = checkpointer.metadata(path / PARAMS_DIR).item_metadata.tree
    except Exception as e:
        raise CheckpointError(f"{path / PARAMS_DIR}: not a readable orbax checkpoint ({e})") from e
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # however it was saved (e.g. sharded by training)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, param_dtype or m.dtype, sharding=one_device), meta)
    try:
        return cfg, checkpointer.restore(path / PARAMS_DIR, target)
    except Exception as e:
        raise CheckpointError(f"{path / PARAMS_DIR}: cannot restore parameters ({e})") from e


def stored_dtype(params: dict):
    return jax.tree.leaves(params)[0].dtype


def load_pretrained(path: str | Path, dtype=None, vision_src: str | Path | None = None
                    ) -> tuple[LlavaForConditionalGeneration, LlavaConfig]:
    """Loads a model from our converted directory or an HF/original LLaVA directory (converted in memory).

    `dtype` (e.g. "bfloat16") sets both the parameter and the compute dtype; by default a converted
    directory keeps its stored dtype and an HF directory loads as float32. `vision_src` is the CLIP
    directory for original-layout checkpoints that lack CLIP weights.
    """
    path = Path(path)
    dtype = jnp.dtype(dtype) if dtype is not None else None
    check_complete(path)
    if is_converted(path):
        cfg, params = read_converted(path, dtype)
    elif (path / "config.json").is_file():
        from atp_jax.convert.importer import convert_hf
        from atp_jax.nested import unflatten

        cfg, flat, _ = convert_hf(path, dtype or jnp.float32, vision_src)
        params = unflatten(flat)
    else:
        raise CheckpointError(f"{path}: neither a converted atp_jax directory ({CONFIG_FILE}) "
                              "nor an HF checkpoint (config.json)")
    dtype = dtype or stored_dtype(params)
    return model_from_params(cfg, params, DtypePolicy(dtype, dtype)), cfg
