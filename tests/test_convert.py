"""The checkpoint converter: both layouts, both file formats, round trips, and clear errors on bad input."""

import dataclasses
import json
import pickle
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from atp_jax import forward, load_pretrained
from atp_jax.convert.checkpoint import read_converted
from atp_jax.convert.importer import convert_hf
from atp_jax.convert.readers import CheckpointError
from atp_jax.nested import flatten
from atp_jax.testing.reference import hf_logits, random_inputs
from launch.convert import main as convert_main


def read_tensors(directory) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="numpy") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def write_dir(directory, tensors: dict, config: dict, fmt: str = "safetensors", shards: int = 1):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for n, group in enumerate(groups, 1):
        fname = f"model-{n:05d}-of-{shards:05d}.{fmt}" if shards > 1 else f"model.{fmt}"
        part = {k: tensors[k] for k in group}
        if fmt == "safetensors":
            save_file(part, directory / fname)
        else:
            torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in part.items()}, directory / fname)
        weight_map.update({k: fname for k in group})
    if shards > 1:
        (directory / f"model.{fmt}.index.json").write_text(json.dumps({"weight_map": weight_map}))


def rename(tensors: dict, table: list[tuple[str, str]]) -> dict:
    out = {}
    for k, v in tensors.items():
        for pattern, repl in table:
            if re.match(pattern, k):
                out[re.sub(pattern, repl, k)] = v
                break
        else:
            out[k] = v
    return out


def original_config(cfg) -> dict:
    t = cfg.text
    return {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu",  # as released
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps, "rope_scaling": None,
        "vocab_size": t.vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1,
        "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "transformers_version": "4.31.0",
        "image_aspect_ratio": "pad", "mm_hidden_size": cfg.vision.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
        "use_mm_proj": True, "mm_projector_lr": None, "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "unfreeze_mm_vision_tower": False,
    }


TO_ORIGINAL = [(r"language_model\.model\.", "model."), (r"language_model\.lm_head\.", "lm_head."),
               (r"multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
               (r"multi_modal_projector\.linear_2\.", "model.mm_projector.2.")]
TO_MEMORY = [(r"language_model\.model\.", "model.language_model."), (r"language_model\.lm_head\.", "lm_head."),
             (r"multi_modal_projector\.", "model.multi_modal_projector."), (r"vision_tower\.", "model.vision_tower.")]


def write_clip_dir(directory, tensors: dict, cfg):
    """A full CLIP checkpoint (vision tower from `tensors`, a stub text tower) as openai/clip-* ships it."""
    clip = {"vision_model." + k[len("vision_tower."):]: v for k, v in tensors.items() if k.startswith("vision_tower.")}
    clip |= {"text_model.embeddings.token_embedding.weight": np.zeros((10, 4), np.float32),
             "logit_scale": np.zeros((), np.float32), "visual_projection.weight": np.zeros((4, 32), np.float32)}
    write_dir(directory, clip, {"model_type": "clip", "projection_dim": 16, "text_config": {"hidden_size": 4},
                                "vision_config": cfg.to_hf_dict()["vision_config"]})


def assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# ---- round trips and layouts ------------------------------------------------------------------------------------


def test_hf_to_jax_to_hf_is_bit_identical(tiny_hf, tiny_cfg, tmp_path, capsys):
    directory, ref = tiny_hf
    assert convert_main(["hf-to-jax", "--src", str(directory), "--dst", str(tmp_path / "jax"), "--quiet"]) == 0
    assert "layout llava-hf" in capsys.readouterr().out
    assert convert_main(["jax-to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "hf2"), "--quiet"]) == 0
    before, after = read_tensors(directory), read_tensors(tmp_path / "hf2")
    assert_same_params(before, after)
    from transformers import LlavaForConditionalGeneration

    reloaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, pixels = random_inputs(tiny_cfg, 1, 5)
    np.testing.assert_array_equal(hf_logits(reloaded.eval(), ids, pixels), hf_logits(ref, ids, pixels))


def test_converted_directory_loads_like_the_hf_directory(tiny_hf, tiny_cfg, tmp_path):
    directory, _ = tiny_hf
    assert convert_main(["hf-to-jax", "--src", str(directory), "--dst", str(tmp_path / "jax"), "--quiet"]) == 0
    ids, pixels = map(jnp.asarray, random_inputs(tiny_cfg, 2, 6))
    a, cfg_a = load_pretrained(tmp_path / "jax")
    b, cfg_b = load_pretrained(directory)
    assert cfg_a == cfg_b == tiny_cfg
    np.testing.assert_array_equal(forward(a, ids, pixels).logits, forward(b, ids, pixels).logits)


def test_bfloat16_conversion(tiny_hf, tmp_path):
    directory, _ = tiny_hf
    assert convert_main(["hf-to-jax", "--src", str(directory), "--dst", str(tmp_path / "bf16"), "--dtype",
                         "bfloat16", "--quiet"]) == 0
    model, _ = load_pretrained(tmp_path / "bf16")
    assert model.language_model.embed_tokens.embedding[...].dtype == jnp.bfloat16


def test_original_layout_and_memory_keys_give_identical_parameters(tiny_hf, tiny_cfg, tmp_path):
    directory, _ = tiny_hf
    tensors = read_tensors(directory)
    _, reference, _ = convert_hf(directory)
    # transformers' in-memory key names.
    write_dir(tmp_path / "memory", rename(tensors, TO_MEMORY), json.loads((directory / "config.json").read_text()))
    _, params, summary = convert_hf(tmp_path / "memory")
    assert summary.layout == "llava-hf-memory"
    assert_same_params(reference, params)
    # transformers v4 on disk: CLIP under vision_tower.vision_model., with a position_ids buffer.
    v4 = rename(tensors, [(r"vision_tower\.", "vision_tower.vision_model.")])
    v4["vision_tower.vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    write_dir(tmp_path / "v4", v4, json.loads((directory / "config.json").read_text()))
    _, params, summary = convert_hf(tmp_path / "v4")
    assert summary.layout == "llava-hf" and summary.skipped == ["vision_tower.vision_model.embeddings.position_ids"]
    assert_same_params(reference, params)
    # liuhaotian layout: sharded .bin without CLIP, CLIP weights from a separate full CLIP checkpoint.
    llm = {k: v for k, v in rename(tensors, TO_ORIGINAL).items() if not k.startswith("vision_tower.")}
    write_dir(tmp_path / "original", llm, original_config(tiny_cfg), fmt="bin", shards=3)
    write_clip_dir(tmp_path / "clip", tensors, tiny_cfg)
    cfg, params, summary = convert_hf(tmp_path / "original", vision_src=tmp_path / "clip")
    assert summary.layout == "original"
    assert_same_params(reference, params)
    assert cfg == dataclasses.replace(tiny_cfg, image_token_index=tiny_cfg.text.vocab_size,
                                      text=dataclasses.replace(tiny_cfg.text, pad_token_id=0))
    # liuhaotian layout with CLIP embedded (self-trained checkpoints), fp16 like the released ones.
    embedded = rename(tensors, TO_ORIGINAL + [(r"vision_tower\.", "model.vision_tower.vision_tower.vision_model.")])
    write_dir(tmp_path / "embedded", {k: v.astype(np.float16) for k, v in embedded.items()}, original_config(tiny_cfg))
    _, params, _ = convert_hf(tmp_path / "embedded", vision_src=tmp_path / "clip")  # CLIP dir gives the config
    assert_same_params({k: v.astype(np.float16).astype(np.float32) for k, v in reference.items()}, params)


def test_original_linear_projector(tiny_hf, tiny_cfg, tmp_path, capsys):
    """LLaVA-1.0-style `mm_projector_type: linear` converts and runs; llava-hf cannot hold it, so export refuses."""
    directory, _ = tiny_hf
    tensors = read_tensors(directory)
    llm = {k: v for k, v in rename(tensors, TO_ORIGINAL).items()
           if not k.startswith(("vision_tower.", "model.mm_projector."))}
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    llm |= {"model.mm_projector.weight": weight, "model.mm_projector.bias": bias}
    write_dir(tmp_path / "linear", llm, {**original_config(tiny_cfg), "mm_projector_type": "linear"})
    write_clip_dir(tmp_path / "clip", tensors, tiny_cfg)
    model, cfg = load_pretrained(tmp_path / "linear", vision_src=tmp_path / "clip")
    assert cfg.projector_type == "linear"
    x = rng.standard_normal((1, 3, 32)).astype(np.float32)
    np.testing.assert_allclose(model.multi_modal_projector(jnp.asarray(x)), x @ weight.T + bias, atol=1e-5)
    ids, pixels = random_inputs(cfg, 1, 4)
    assert np.isfinite(np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pixels)).logits)).all()
    assert convert_main(["hf-to-jax", "--src", str(tmp_path / "linear"), "--dst", str(tmp_path / "jax"),
                         "--vision-src", str(tmp_path / "clip"), "--quiet"]) == 0
    assert convert_main(["jax-to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "hf"), "--quiet"]) == 1
    assert "no 'linear' projector" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_sharded_export_loads_in_transformers(tiny_hf, tmp_path):
    directory, _ = tiny_hf
    assert convert_main(["hf-to-jax", "--src", str(directory), "--dst", str(tmp_path / "jax"), "--quiet"]) == 0
    assert convert_main(["jax-to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "hf"),
                         "--max-shard-gb", str(40_000 / 2**30), "--quiet"]) == 0
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    from transformers import LlavaForConditionalGeneration

    _, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_params(read_tensors(directory), read_tensors(tmp_path / "hf"))


# ---- bad checkpoints ---------------------------------------------------------------------------------------------


def corrupt_missing(d, tensors, config):
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    write_dir(d, tensors, config)
    return "missing tensors): ['language_model.model.layers.1.mlp.up_proj.weight']"


def corrupt_extra(d, tensors, config):
    tensors["language_model.model.layers.0.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    write_dir(d, tensors, config)
    return "language_model.model.layers.0.mlp.extra_proj.weight"


def corrupt_shape(d, tensors, config):
    tensors["multi_modal_projector.linear_2.weight"] = np.zeros((64, 63), np.float32)
    write_dir(d, tensors, config)
    return "multi_modal_projector.linear_2.weight"


def corrupt_truncated(d, tensors, config):
    write_dir(d, tensors, config)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "model.safetensors"


def corrupt_bin_pickle(d, tensors, config):
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    state = {k: torch.from_numpy(v) for k, v in tensors.items()}
    state["language_model.model.norm.weight"] = "not a tensor"
    torch.save(state, d / "pytorch_model.bin")
    return "language_model.model.norm.weight"


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def corrupt_bin_code(d, tensors, config):
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    return "pytorch_model.bin"


@pytest.mark.parametrize("corrupt", [corrupt_missing, corrupt_extra, corrupt_shape, corrupt_truncated,
                                     corrupt_bin_pickle, corrupt_bin_code])
def test_bad_checkpoint_gives_clear_error_and_no_output(corrupt, tiny_hf, tmp_path, capsys):
    directory, _ = tiny_hf
    config = json.loads((directory / "config.json").read_text())
    expected = corrupt(tmp_path / "bad", read_tensors(directory), config)
    dst = tmp_path / "out" / "converted"
    assert convert_main(["hf-to-jax", "--src", str(tmp_path / "bad"), "--dst", str(dst), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert "this must never run" not in err
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no partial directory


def test_existing_destination_is_refused(tiny_hf, tmp_path, capsys):
    directory, _ = tiny_hf
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("precious")
    assert convert_main(["hf-to-jax", "--src", str(directory), "--dst", str(tmp_path / "dst"), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "dst" / "keep.txt").read_text() == "precious"


def test_destination_inside_source_is_refused(tiny_hf, capsys):
    directory, _ = tiny_hf
    for dst in (directory, directory / "sub", directory.parent):
        assert convert_main(["hf-to-jax", "--src", str(directory), "--dst", str(dst), "--overwrite", "--quiet"]) == 1
        assert "must lie outside" in capsys.readouterr().err
    assert (directory / "config.json").exists()


def test_unknown_config_field_is_an_error(tiny_hf, tmp_path, capsys):
    directory, _ = tiny_hf
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["sliding_window"] = 128
    write_dir(tmp_path / "bad", read_tensors(directory), config)
    assert convert_main(["hf-to-jax", "--src", str(tmp_path / "bad"), "--dst", str(tmp_path / "o"), "--quiet"]) == 1
    assert "sliding_window" in capsys.readouterr().err


def test_overwrite_replaces_the_destination(tiny_hf, tmp_path):
    directory, _ = tiny_hf
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "stale.txt").write_text("old")
    assert convert_main(["hf-to-jax", "--src", str(directory), "--dst", str(tmp_path / "dst"), "--overwrite",
                         "--quiet"]) == 0
    assert not (tmp_path / "dst" / "stale.txt").exists() and (tmp_path / "dst" / "atp_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no staging or backup left behind


def test_load_pretrained_on_a_directory_without_checkpoint(tmp_path):
    from atp_jax.convert.readers import CheckpointError

    with pytest.raises(CheckpointError, match="neither a converted atp_jax directory"):
        load_pretrained(tmp_path)


def test_assemble_a_stage_one_start_from_llama_and_clip(tiny_hf, tiny_cfg, tmp_path, capsys):
    """Vicuna + CLIP -> LLaVA with a fresh projector: LLM and vision weights exactly the sources'."""
    directory, _ = tiny_hf
    tensors = read_tensors(directory)
    llama = rename({k: v for k, v in tensors.items() if k.startswith("language_model.")}, TO_ORIGINAL)
    write_dir(tmp_path / "vicuna", llama, {**tiny_cfg.to_hf_dict()["text_config"], "model_type": "llama",
                                           "architectures": ["LlamaForCausalLM"]})
    write_clip_dir(tmp_path / "clip", tensors, tiny_cfg)
    assert convert_main(["assemble", "--src", str(tmp_path / "vicuna"), "--vision-src", str(tmp_path / "clip"),
                         "--dst", str(tmp_path / "stage1"), "--quiet"]) == 0
    assert "projector mlp2x_gelu initialised" in capsys.readouterr().out
    model, cfg = load_pretrained(tmp_path / "stage1")
    assert cfg.image_token_index == cfg.text.vocab_size and cfg.num_image_tokens == tiny_cfg.num_image_tokens
    _, reference, _ = convert_hf(directory)
    _, params = read_converted(tmp_path / "stage1")
    flat = flatten(params)
    for k, v in reference.items():
        if k.startswith("multi_modal_projector."):
            assert flat[k].shape == v.shape and np.isfinite(np.asarray(flat[k])).all()
            assert not np.array_equal(np.asarray(flat[k]), np.asarray(v))  # fresh, not copied
        else:
            np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg=k)
    with pytest.raises(CheckpointError, match="LLaMA"):
        from atp_jax.convert.importer import assemble

        assemble(directory, tmp_path / "clip")  # a LLaVA directory is not a LLaMA checkpoint
