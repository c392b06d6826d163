"""Running launch scripts in tests: a tiny converted checkpoint, main() in process, finished background runs,
their JSONL output."""

import contextlib
import dataclasses
import importlib.util
import io
import json
import shutil
import subprocess
from pathlib import Path


def tiny_checkpoint(d: Path, texts: list[str], context: int) -> Path:
    """A converted tiny LLaVA in `d`/ckpt whose vocabulary is a 400-piece tokenizer trained on `texts` and the
    conversation templates, plus <image> (400) and <pad> (401); `context` is its max_position_embeddings."""
    from atp_jax.convert.checkpoint import save_converted
    from atp_jax.convert.importer import convert_hf
    from atp_jax.data.conversation import template_text
    from atp_jax.data.tokenizer import train_tokenizer
    from atp_jax.models.config import LlavaConfig
    from atp_jax.nested import unflatten
    from atp_jax.testing.reference import save_hf_model

    train_tokenizer(texts + template_text() * 5, d / "tok", vocab_size=400)
    cfg = LlavaConfig.tiny(image_token_index=400)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=402, max_position_embeddings=context))
    save_hf_model(cfg, d / "hf", seed=0)
    for f in (d / "tok").iterdir():
        shutil.copy(f, d / "hf" / f.name)
    _, flat, _ = convert_hf(d / "hf")
    save_converted(d / "ckpt", cfg, unflatten(flat), sidecars_from=d / "hf")
    return d / "ckpt"


def load_main(script: Path, name: str):
    """The `main` of a launch script (launch/ is not a package, so it is loaded from its file)."""
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def run_main(main, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `main([args...])`; argparse's SystemExit counts as a status. JAX's
    persistent compilation cache, which `--compilation-cache` turns on for the process, is turned back off
    afterwards, so that later tests do not write their programs into this test's directory."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    saved = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:
                code = e.code
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
    return code, out.getvalue(), err.getvalue()


def finished(runs, name: str) -> subprocess.CompletedProcess:
    """The completed background run `name` of a dict of futures; it must have exited 0."""
    proc = runs[name].result()
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
