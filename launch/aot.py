"""Compile the training step for a TPU slice on this machine, with no TPU: memory per chip, fits or not.

  python launch/aot.py --config configs/llava15_7b_atp.py --topology v4:2x2x4 [--config.FIELD=VALUE ...]

Builds the step `launch/train.py` runs for the config (the same model, dtype policy, ATP in soft mode, frozen
groups, mesh rules, donation and remat) from abstract shapes only, compiles it for the named slice (needs
libtpu: `pip install "jax[tpu]"`) and prints per chip: arguments (parameters and optimizer state), outputs,
temporaries, the total against the chip's HBM, the compile time, model FLOPs per step and the roofline step
time and tokens/s at the chip's bf16 peak, the collectives of one step, and any large tensor found whole on
one chip. The last line is one JSON object. Exit status 0: it fits; 1: it does not; 2: bad input.
Topologies: v4:2x2x4 (v4-32), v5p:2x2x4 (v5p-32), v5e:16x16 (v5e-256), v6e:4x4, v5e:2x2, ...

With --serve, the serving programs instead (the ones launch/infer.py runs), for the config's model in bfloat16
split over the slice's chips (tensor parallel; --data splits the batch), a batch and a prompt length:

  python launch/aot.py --serve --topology v5e:2x2 --batch 8 --prompt_len 2048 [--methods none,atp] [--mode compact]

per method, each program's memory per chip, the KV cache (all chips and per chip), and how many programs a
server may compile (compact mode: one per bucket a run of layers can land in).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the slice; never look for a local accelerator

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "llava15_7b_atp.py"),
                                          "a configs/*.py file (get_config())", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v4:2x2x4", "TPU slice, <chip>:<shape> (chips v4, v5e, v5p, v6e)")
_STAGE = flags.DEFINE_string("stage", "", "for a config with stages: the stage to compile (default: the last)")
_VOCAB = flags.DEFINE_integer("vocab_size", 32064, "vocabulary of a fresh model (presets bring their own)")
_SERVE = flags.DEFINE_boolean("serve", False, "compile the serving programs instead of the training step")
_BATCH = flags.DEFINE_integer("batch", 8, "--serve: prompts per batch")
_PROMPT = flags.DEFINE_integer("prompt_len", 2048, "--serve: tokens per prompt, the image's included")
_NEW = flags.DEFINE_integer("new_tokens", 128, "--serve: room in the KV cache for generated tokens")
_METHODS = flags.DEFINE_list("methods", ["none", "atp"], "--serve: pruning methods to compile (none: unpruned)")
_MODE = flags.DEFINE_enum("mode", "compact", ["compact", "masked"], "--serve: how pruned prefills run")
_KEEP = flags.DEFINE_list("keep", [], "--serve: kept fraction of the visual tokens after each module "
                                      "(default: half at each)")
_DATA = flags.DEFINE_integer("data", 1, "--serve: mesh axis splitting the batch; the other chips split weights")

def stage_config(config):
    if not config.get("stages"):
        return config
    from atp_jax.train.stages import stage_configs

    stages = dict(stage_configs(config, "/nonexistent"))
    name = _STAGE.value or config.stages[-1]
    if name not in stages:
        raise ValueError(f"--stage {name!r}: the config's stages are {list(stages)}")
    config = stages[name]
    config.model.init_from = ""  # a fresh model of the configured size stands in for the previous stage's
    return config


def report(result, chip) -> dict:
    from atp_jax.aot.chips import GiB
    from atp_jax.pruning.accounting import train_step_flops

    c = result.cost
    model_flops = train_step_flops(result.model_config, result.seq_len, result.batch, remat=result.remat,
                                   train_vision=result.train_vision) / result.chips
    step_s = model_flops / chip.peak_bf16_flops
    fits = c.total_bytes <= chip.hbm_bytes
    rows = [("topology", f"{result.topology} ({result.chips} chips, mesh {result.mesh})"),
            ("step", f"global batch {result.batch} x {result.seq_len} tokens; {result.parameters / 1e9:.2f}B "
                     f"parameters, {result.trainable / 1e9:.2f}B trained; attention {result.attention}"),
            ("compile", f"{c.compile_s:.0f} s"),
            ("arguments", f"{c.argument_bytes / GiB:.2f} GiB (parameters, optimizer state, batch)"),
            ("outputs", f"{c.output_bytes / GiB:.2f} GiB ({c.alias_bytes / GiB:.2f} GiB in donated buffers)"),
            ("temporaries", f"{c.temp_bytes / GiB:.2f} GiB"),
            ("total", f"{c.total_bytes / GiB:.2f} GiB of {chip.hbm_bytes / GiB:.1f} GiB HBM: "
                      f"{'fits' if fits else 'DOES NOT FIT'}"),
            ("model FLOPs", f"{model_flops / 1e12:.1f} TFLOP per chip per step (XLA's cost analysis, loop "
                            f"bodies once: {c.flops / 1e12:.1f})"),
            ("roofline", f"{step_s:.2f} s per step at {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
                         f"{result.batch * result.seq_len / result.chips / step_s:,.0f} tokens/s per chip")]
    for kind, v in sorted(c.collectives.items()):
        rows.append((kind, f"{v['count']} per step, {v['bytes'] / GiB:.2f} GiB"))
    for name, size in c.whole_tensors:
        rows.append(("whole on a chip", f"{name}: {size / GiB:.2f} GiB (gathered for use, not stored)"))
    for name, size in result.unsharded:
        rows.append(("NOT SHARDED", f"{name}: {size / GiB:.2f} GiB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return {"topology": result.topology, "chips": result.chips, "mesh": result.mesh, "batch": result.batch,
            "attention": result.attention,
            "seq_len": result.seq_len, "compile_s": c.compile_s, "argument_bytes": c.argument_bytes,
            "output_bytes": c.output_bytes, "alias_bytes": c.alias_bytes, "temp_bytes": c.temp_bytes,
            "code_bytes": c.code_bytes, "total_bytes": c.total_bytes, "hbm_bytes": chip.hbm_bytes, "fits": fits,
            "model_flops_per_chip": model_flops, "xla_flops_per_chip": c.flops, "roofline_step_s": step_s,
            "collectives": c.collectives, "whole_tensors": [list(t) for t in c.whole_tensors],
            "unsharded": [list(t) for t in result.unsharded]}


def serve_report(results, chip) -> dict:
    from atp_jax.aot.chips import GiB

    out = []
    for r in results:
        fits = r.peak_bytes <= chip.hbm_bytes
        print(f"\n{r.method} ({r.mode}) on {r.topology} ({r.chips} chips, mesh {r.mesh}): batch {r.batch} x "
              f"{r.prompt_len} prompt tokens + {r.new_tokens} new, attention {r.attention}; runs of layers on "
              f"{list(r.segment_lengths)} "
              f"tokens" + (f" (kept after each module: {list(r.keep)})" if r.keep else ""))
        width = max(len(p.name) for p in r.programs)
        print(f"  {'program':<{width}}  arguments  temporaries  total GiB  compile s")
        for p in r.programs:
            print(f"  {p.name:<{width}}  {p.argument_bytes / GiB:9.2f}  {p.temp_bytes / GiB:11.2f}  "
                  f"{p.total_bytes / GiB:9.2f}  {p.compile_s:9.1f}")
        possible = ", ".join(f"{k} {v}" for k, v in r.possible_programs.items())
        print(f"  weights {r.parameter_bytes / GiB:.2f} GiB; KV cache {r.cache_bytes / GiB:.3f} GiB "
              f"({r.cache_bytes_per_chip / GiB:.3f} per chip); peak {r.peak_bytes / GiB:.2f} GiB of "
              f"{chip.hbm_bytes / GiB:.1f} per chip: {'fits' if fits else 'DOES NOT FIT'}")
        print(f"  programs compiled {len(r.programs)}; a server may compile up to: {possible}")
        out.append({"method": r.method, "mode": r.mode, "segment_lengths": list(r.segment_lengths),
                    "keep": list(r.keep), "cache_bytes": r.cache_bytes, "cache_bytes_per_chip": r.cache_bytes_per_chip,
                    "parameter_bytes": r.parameter_bytes, "peak_bytes": r.peak_bytes, "fits": fits,
                    "programs": {p.name: {"total_bytes": p.total_bytes, "temp_bytes": p.temp_bytes,
                                          "compile_s": p.compile_s} for p in r.programs},
                    "possible_programs": r.possible_programs})
    first = results[0]
    return {"topology": first.topology, "chips": first.chips, "mesh": first.mesh, "batch": first.batch,
            "prompt_len": first.prompt_len, "new_tokens": first.new_tokens, "hbm_bytes": chip.hbm_bytes,
            "fits": all(o["fits"] for o in out), "methods": out}


def serve(config, chip) -> dict:
    from atp_jax.aot.analysis import DoesNotFit
    from atp_jax.aot.inference import serving_cost
    from atp_jax.train.program import attention_implementation, model_config

    cfg = model_config(config, _VOCAB.value, _VOCAB.value - 1)
    keep = tuple(float(k) for k in _KEEP.value) or None
    pruning = {k: v for k, v in config.pruning.to_dict().items() if k not in ("method", "mode")}
    results, refused = [], []
    for method in _METHODS.value:
        try:
            results.append(serving_cost(cfg, _TOPOLOGY.value, method=method, mode=_MODE.value, batch=_BATCH.value,
                                        prompt_len=_PROMPT.value, new_tokens=_NEW.value, keep=keep,
                                        data=_DATA.value, pruning=pruning,
                                        attention=attention_implementation(config)))
        except DoesNotFit as e:  # the compiler refused one of its programs: no figures, the other methods go on
            print(f"\n{method}: DOES NOT FIT ({_TOPOLOGY.value}): {e}")
            refused.append({"method": method, "fits": False, "compiler": str(e)})
    figures = serve_report(results, chip) if results else {"topology": _TOPOLOGY.value, "methods": []}
    figures["methods"] += refused
    figures["fits"] = all(m["fits"] for m in figures["methods"])
    return figures


def main(argv) -> None:
    del argv
    from atp_jax.aot.analysis import DoesNotFit
    from atp_jax.aot.chips import chip_of
    from atp_jax.aot.training import training_cost
    from atp_jax.convert.readers import CheckpointError

    try:
        chip = chip_of(_TOPOLOGY.value)
        config = stage_config(_CONFIG.value)
        if _SERVE.value:
            figures = serve(config, chip)
            print(json.dumps(figures))
            sys.exit(0 if figures["fits"] else 1)
        result = training_cost(config, _TOPOLOGY.value, vocab_size=_VOCAB.value)
    except (ValueError, OSError, CheckpointError) as e:  # bad topology or config, a missing model.init_from
        print(f"aot.py: {e}", file=sys.stderr)
        sys.exit(2)
    except DoesNotFit as e:  # the compiler itself found it too large: no memory figures to print
        print(f"DOES NOT FIT ({_TOPOLOGY.value}): {e}")
        print(json.dumps({"topology": _TOPOLOGY.value, "fits": False, "compiler": str(e)}))
        sys.exit(1)
    figures = report(result, chip)
    print(json.dumps(figures))
    sys.exit(0 if figures["fits"] else 1)


if __name__ == "__main__":
    app.run(main)
