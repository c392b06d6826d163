"""Every pruning method runs on a model the trainer exported: `launch/infer.py` and `launch/eval.py` with each of
atp, fastv, pdrop, random and none on a 4-layer model from a short training run, pruning where the main job's
report prunes (the placement saved in its pruning_config.json)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import load_main, read_jsonl, run_main

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("atp", "fastv", "pdrop", "random", "none")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A 4-layer ATP model (modules after layers 0, 1, 2) trained for two steps and exported, an image and a
    three-question POPE file."""
    from atp_jax.train.trainer import train
    from tests.test_train import small_config

    d = tmp_path_factory.mktemp("every_method")
    config = small_config(d / "cache", total_steps=2, **{"model.text.num_hidden_layers": 4,
                                                         "pruning.atp_layers": (0, 1, 2)})
    train(config, d / "run")
    (d / "images").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(image).save(d / "images" / "a.png")
    questions = [{"question_id": i, "image": "a.png", "text": f"Is there a {c} circle?", "label": lb,
                  "category": "random"} for i, (c, lb) in enumerate([("red", "yes"), ("blue", "no"), ("green", "no")])]
    (d / "pope.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return d


def expected_per_layer(model_dir: Path, method: str) -> list[float] | None:
    """Visual tokens per layer the report's baseline at its own schedule keeps (None: ATP, input dependent)."""
    from atp_jax.convert.checkpoint import load_pretrained
    from atp_jax.eval.shapes import baseline_model
    from atp_jax.pruning.checkpoint import load_pruned

    llava, cfg = load_pretrained(model_dir)
    atp, _ = load_pruned(model_dir, llava, method="atp")
    p = cfg.num_image_tokens
    if method == "none":
        return [p] * 4
    if method == "atp":
        return None
    pcfg = baseline_model(llava, method, atp.pcfg).pcfg
    if method == "fastv":
        return [p] * pcfg.fastv_layer + [round(p * (1 - pcfg.fastv_ratio))] * (4 - pcfg.fastv_layer)
    if method == "pdrop":
        stages = [p] + [round(p * pcfg.pdrop_keep ** (i + 1)) for i in range(len(pcfg.pdrop_layers))]
        return [stages[sum(layer >= s for s in pcfg.pdrop_layers)] for layer in range(4)]
    return [p] + [round(p * f) for f in pcfg.random_schedule]


def test_the_saved_config_places_every_method_on_the_model(exported):
    saved = json.loads((exported / "run" / "model" / "pruning_config.json").read_text())
    assert saved["atp_layers"] == [0, 1, 2] and saved["fastv_layer"] == 1 and saved["pdrop_layers"] == [1, 2]
    assert saved["random_schedule"] == [0.5, 0.25, 0.125]


@pytest.mark.parametrize("method", METHODS)
def test_infer_and_eval_run_every_method(exported, method, tmp_path):
    model = exported / "run" / "model"
    infer = load_main(ROOT / "launch" / "infer.py", "infer_cli")
    code, out, err = run_main(infer, "--checkpoint", model, "--image", exported / "images" / "a.png", "--prompt",
                              "Is there a red circle?", "--prune", method, "--max-new-tokens", 2, "--json")
    assert code == 0, err[-3000:]
    answer = json.loads(out.strip().splitlines()[-1])
    want = expected_per_layer(model, method)
    if want is not None:
        assert answer["visual_tokens_per_layer"] == want
    else:
        per_layer = answer["visual_tokens_per_layer"]
        assert per_layer[0] == 16 and all(a >= b for a, b in zip(per_layer, per_layer[1:], strict=False))
    evaluate = load_main(ROOT / "launch" / "eval.py", "eval_cli")
    code, _, err = run_main(evaluate, "--benchmark", "pope", "--questions", exported / "pope.jsonl",
                            "--image-folder", exported / "images", "--checkpoint", model, "--output", tmp_path / "out",
                            "--prune", method, "--max-new-tokens", 2, "--batch-size", 3)
    assert code == 0, err[-3000:]
    rows = read_jsonl(tmp_path / "out" / "answers.jsonl")
    assert len(rows) == 3
    if want is not None:
        assert all(r["visual_tokens_per_layer"] == want for r in rows)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["avg_visual_tokens"] == pytest.approx(np.mean([r["avg_visual_tokens"] for r in rows]))
