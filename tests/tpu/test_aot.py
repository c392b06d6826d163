"""Ahead-of-time compilation for TPU slices on this CPU (libtpu, no TPU): the trainer's own step, its memory per
chip, its collectives, and the sharding check, at a tiny size; and the HLO reading on a program of known shape."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parents[2]


def train_config():
    sys.path.insert(0, str(ROOT / "tests"))
    from train_config import get_config

    return get_config()


def test_topologies_give_one_device_per_chip():
    from atp_jax.aot.chips import chip_count, topology_devices

    for topology, chips in (("v5e:2x2", 4), ("v4:2x2x1", 4), ("v5p:2x2x1", 4)):
        assert chip_count(topology) == chips
        assert len(topology_devices(topology)) == chips  # v4 and v5p: megacore, one device per chip
    with pytest.raises(ValueError, match="expected <chip>:<shape>"):
        topology_devices("v9:2x2")


def test_the_collectives_of_a_scanned_fsdp_program_are_counted_per_iteration():
    from atp_jax.aot.analysis import collectives, compile_cost
    from atp_jax.aot.chips import topology_devices

    mesh = Mesh(np.array(topology_devices("v5e:2x2")), ("x",))
    layers, width = 8, 512

    def forward(w, x):  # w sharded on its input dim: each layer's weight is all-gathered inside the loop
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    jitted = jax.jit(forward, in_shardings=(NamedSharding(mesh, P(None, "x", None)), NamedSharding(mesh, P("x"))))
    w = jax.ShapeDtypeStruct((layers, width, width), jnp.float32)
    cost, compiled = compile_cost("toy", jitted, w, jax.ShapeDtypeStruct((64, width), jnp.float32),
                                  large_shapes={"w": w.shape}, min_whole_bytes=1)
    gathers = cost.collectives["all-gather"]
    assert gathers["count"] == layers  # one per layer, not one for the loop
    # each gathers one whole layer (XLA may gather it in bf16, the default matmul precision on TPU)
    assert gathers["bytes"] // layers in (width * width * 2, width * width * 4)
    assert cost.argument_bytes == (layers * width * width + 64 * width) * 4 // 4  # a quarter on each chip
    assert cost.whole_tensors == ()  # the stack of weights is never whole on a chip, one layer at a time is
    # XLA's cost analysis counts the loop body once, not once per layer (why launch/aot.py uses model FLOPs):
    one_layer = 2 * (64 // 4) * width * width  # each chip's rows
    assert one_layer <= cost.flops < 2 * one_layer
    assert collectives(compiled.as_text()) == cost.collectives


def test_the_train_step_compiles_for_a_slice_with_its_state_sharded():
    from atp_jax.aot.training import training_cost

    config = train_config()
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.optim.vision_lr = 0.0  # frozen, as in the ATP stage
    result = training_cost(config, "v5e:2x2", vocab_size=160, min_unsharded_bytes=2**14)
    cost = result.cost
    assert result.mesh == {"data": 1, "fsdp": 4, "tensor": 1} and result.chips == 4
    assert cost.argument_bytes > 0 and cost.temp_bytes > 0 and cost.flops > 0
    assert cost.alias_bytes > 0  # the state is donated
    # every parameter and moment of 16 kB or more is split over the chips, but the threshold MLPs: replicated by
    # design (0.1M parameters at LLaVA's size), here as large as the tiny model's matrices
    assert result.unsharded and all("['thresholds']" in path for path, _ in result.unsharded)
    assert cost.collectives["all-gather"]["count"] > 0  # FSDP: weights gathered for use
    assert result.trainable < result.parameters  # the frozen vision tower


def test_the_command_prints_the_memory_and_exits_by_whether_it_fits(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "aot.py"), "--config", str(ROOT / "tests" / "train_config.py"),
           "--topology", "v5e:2x2", "--vocab_size", "160"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["fits"] and 0 < figures["total_bytes"] < figures["hbm_bytes"]
    assert "fits" in done.stdout and "temporaries" in done.stdout
    bad = subprocess.run(cmd[:-4] + ["--topology", "v5e:2x"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "topology 'v5e:2x'" in bad.stderr
    missing = subprocess.run(cmd + [f"--config.model.init_from={tmp_path / 'none'}"], capture_output=True,
                             text=True, timeout=600)
    assert missing.returncode == 2 and str(tmp_path / "none") in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_program_larger_than_the_chip_is_refused_by_name():
    from atp_jax.aot.analysis import DoesNotFit, compile_cost
    from atp_jax.aot.chips import topology_devices

    mesh = Mesh(np.array(topology_devices("v5e:2x2")), ("x",))
    # a 25.6 GB sorted outer product per chip, on 16 GB chips
    jitted = jax.jit(lambda x: jnp.sort(jnp.outer(x, x), axis=0)[::1000], in_shardings=NamedSharding(mesh, P()))
    with pytest.raises(DoesNotFit, match="RESOURCE_EXHAUSTED.*exceeds available HBM"):
        compile_cost("big", jitted, jax.ShapeDtypeStruct((80000,), jnp.float32))


def test_decode_shapes_counts_non_increasing_bucket_choices():
    import itertools

    from atp_jax.aot.inference import decode_shapes, segment_buckets

    buckets = segment_buckets(48, 16, tuple(i / 16 for i in range(1, 17)))
    assert buckets == [33, 36, 39, 42, 45, 48]  # the 32 text tokens plus 0 to 16 visual ones, in steps of 3
    for runs in (1, 2, 3):
        brute = sum(all(a >= b for a, b in itertools.pairwise(c)) for c in itertools.product(buckets, repeat=runs))
        assert decode_shapes(buckets, runs) == brute
    assert decode_shapes(buckets, 0) == 1


def test_the_serving_programs_compile_for_a_slice_and_compaction_shrinks_the_cache():
    import dataclasses

    from atp_jax.aot.inference import serving_cost
    from atp_jax.models.config import LlavaConfig

    cfg = LlavaConfig.tiny()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_key_value_heads=4))  # split over 4 chips
    batch, prompt, new = 4, 48, 16
    text = cfg.text

    def cache_bytes(lengths_per_layer):  # keys and values, bf16, prompt slots plus the generation room
        return sum(2 * batch * (n + new) * text.num_key_value_heads * text.head_dim * 2 for n in lengths_per_layer)

    full = serving_cost(cfg, "v5e:2x2", method="none", batch=batch, prompt_len=prompt, new_tokens=new)
    assert full.mesh == {"data": 1, "fsdp": 1, "tensor": 4} and full.mode == "masked"
    assert [p.name for p in full.programs] == ["prefill", "decode (16 steps)", "server decode (8 steps)"]
    assert full.cache_bytes == cache_bytes([prompt] * 4)
    assert full.cache_bytes_per_chip == full.cache_bytes // 4  # the KV heads split over the tensor axis

    atp = serving_cost(cfg, "v5e:2x2", method="atp", mode="compact", batch=batch, prompt_len=prompt,
                       new_tokens=new, keep=(0.5, 0.25, 0.125))
    # modules after layers 0, 1, 2; 32 text tokens always stay, plus 8, 4, 2 of the 16 visual ones, in buckets
    assert atp.segment_lengths == (48, 42, 36, 36)
    assert [p.name for p in atp.programs] == ["prefill (compact)", "decode (16 steps)", "server decode (8 steps)"]
    assert atp.cache_bytes == cache_bytes([48, 42, 36, 36]) < full.cache_bytes
    assert atp.cache_bytes_per_chip == atp.cache_bytes // 4
    assert atp.possible_programs == {"prefill": 56, "decode": 56}  # non-increasing capacities over 6 buckets
    assert all(p.total_bytes > 0 for p in atp.programs)

    masked = serving_cost(cfg, "v5e:2x2", method="atp", mode="masked", batch=batch, prompt_len=prompt,
                          new_tokens=new)
    assert masked.segment_lengths == (48,) * 4 and masked.cache_bytes == full.cache_bytes  # nothing removed
    with pytest.raises(ValueError, match="one fraction in"):
        serving_cost(cfg, "v5e:2x2", method="atp", keep=(0.5,), batch=batch, prompt_len=prompt)


def test_the_command_compiles_the_serving_programs(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "aot.py"), "--config", str(ROOT / "tests" / "train_config.py"),
           "--serve", "--topology", "v5e:2x2", "--vocab_size", "160", "--batch", "4", "--prompt_len", "64",
           "--new_tokens", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["fits"] and [m["method"] for m in figures["methods"]] == ["none", "atp"]
    unpruned, atp = figures["methods"]
    assert atp["mode"] == "compact" and atp["cache_bytes"] < unpruned["cache_bytes"]
    assert "decode (16 steps)" in done.stdout and "KV cache" in done.stdout
    bad = subprocess.run(cmd + ["--keep", "0.5,0.5,0.5"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "keep" in bad.stderr and "Traceback" not in bad.stderr
