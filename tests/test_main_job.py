"""The main job: the stage chain, the baselines' budgets, the comparison report, and a tiny chain end to end."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ml_collections import ConfigDict

from atp_jax.eval import report as rp
from atp_jax.eval import shapes as ev
from atp_jax.train import stages

ROOT = Path(__file__).resolve().parent.parent


def chain_config(**stage_steps):
    from configs.tiny_synthetic import get_config

    c = get_config()
    for name, steps in stage_steps.items():
        c.stage_overrides[name].total_steps = steps
    return c


def test_stage_configs_chain_each_stage_to_the_model_before_it(tmp_path):
    config = chain_config()
    got = dict(stages.stage_configs(config, tmp_path))
    assert list(got) == ["pretrain", "finetune", "atp"]
    assert got["pretrain"].model.init_from == config.model.init_from == ""
    assert got["finetune"].model.init_from == str(tmp_path.absolute() / "pretrain" / "model")
    assert got["atp"].model.init_from == str(tmp_path.absolute() / "finetune" / "model")
    # overrides are applied field by field, the rest comes from the base config
    assert got["pretrain"].data.source == "shapes_vqa/caption" and got["pretrain"].data.template == "plain"
    assert got["finetune"].data.source == "shapes_vqa/multi" and got["finetune"].pruning.method == "none"
    assert got["atp"].data.source == config.data.source == "shapes_vqa/vqa"
    assert got["atp"].pruning.method == "atp" and got["atp"].optim.vision_lr == 0.0
    assert got["atp"].pruning.target_ratio == config.stage_overrides.atp.pruning.target_ratio
    assert got["atp"].pruning.temperature == config.pruning.temperature  # not overridden: the base config's
    assert all("stages" not in c and "report" not in c for c in got.values())


def test_a_stage_override_of_a_missing_field_is_an_error(tmp_path):
    config = chain_config()
    config.stage_overrides.atp.optim = ConfigDict(dict(learning_rate=1.0))
    with pytest.raises(ValueError, match=r"stage_overrides\.atp\.optim\.learning_rate"):
        stages.stage_configs(config, tmp_path)
    config = chain_config()
    config.stages = ("pretrain", "finetune")  # a shorter chain leaves the other overrides unused
    assert [name for name, _ in stages.stage_configs(config, tmp_path)] == ["pretrain", "finetune"]


def test_run_stages_skips_finished_stages_and_stops_after_an_interrupted_one(tmp_path):
    calls = []

    def fake_train(config, workdir, finish=True):
        calls.append(workdir.name)
        if finish:
            (workdir / "model").mkdir(parents=True)
            (workdir / "model" / "atp_config.json").write_text("{}")

    config = chain_config()
    assert stages.run_stages(config, tmp_path, fake_train) == tmp_path / "atp" / "model"
    assert calls == ["pretrain", "finetune", "atp"]
    calls.clear()
    stages.run_stages(config, tmp_path, fake_train)
    assert calls == []  # all done: nothing reruns
    for name in ("finetune", "atp"):
        (tmp_path / name / "model" / "atp_config.json").unlink()
    assert stages.run_stages(config, tmp_path, lambda c, w: fake_train(c, w, finish=False)) is None
    assert calls == ["finetune"]  # stopped early (preempted): the ATP stage does not start


def test_a_finished_stage_is_not_reused_under_another_config(tmp_path):
    def fake_train(config, workdir):
        (workdir / "model").mkdir(parents=True)
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), default=str))  # as the trainer saves it
        (workdir / "model" / "atp_config.json").write_text("{}")

    stages.run_stages(chain_config(), tmp_path / "run", fake_train)
    longer = chain_config(finetune=3500)
    with pytest.raises(stages.StageConfigError, match=r"stage finetune .*total_steps: 3000 -> 3500.*another --workdir"):
        stages.run_stages(longer, tmp_path / "run", fake_train)
    other_start = chain_config()
    other_start.model.init_from = "/checkpoints/vicuna"
    with pytest.raises(stages.StageConfigError, match=r"stage pretrain .*init_from: '' -> '/checkpoints/vicuna'"):
        stages.run_stages(other_start, tmp_path / "run", fake_train)
    shutil.copytree(tmp_path / "run", tmp_path / "moved")  # the later stages' starts move with the workdir
    config = chain_config()
    config.mesh.data, config.log_every = 2, 1  # how it runs, not what it trains: the finished stages stand
    calls = []
    moved = tmp_path / "moved"
    assert stages.run_stages(config, moved, lambda c, w: calls.append(w)) == moved / "atp" / "model"
    assert calls == []


def test_a_stage_saved_before_a_field_existed_compares_it_as_its_earlier_behaviour(tmp_path):
    def fake_train(config, workdir):
        saved = config.to_dict()
        del saved["distill"], saved["model"]["attention"]  # a run saved before these fields were added
        (workdir / "model").mkdir(parents=True)
        (workdir / "config.json").write_text(json.dumps(saved, default=str))
        (workdir / "model" / "atp_config.json").write_text("{}")

    stages.run_stages(chain_config(), tmp_path, fake_train)
    calls = []
    assert stages.run_stages(chain_config(), tmp_path, lambda c, w: calls.append(w)) == tmp_path / "atp" / "model"
    assert calls == []  # the new fields at the values that do what atp_jax did before: reused
    distilled = chain_config()
    distilled.distill.weight = 0.5
    with pytest.raises(stages.StageConfigError, match=r"distill.weight: 0.0 -> 0.5"):
        stages.run_stages(distilled, tmp_path, fake_train)


@pytest.mark.parametrize("target", [144.0, 100.0, 60.0, 40.0])
def test_fastv_and_pdrop_counts_meet_the_average_budget(target):
    p, n = 144, 8
    c = ev.fastv_counts(np.array([target]), 1, p, n)
    assert c.shape == (1, 1)
    assert abs((1 * p + 7 * c[0, 0]) / n - target) <= 0.5
    stage_layers = (2, 4, 6)
    counts = ev.pdrop_counts(np.array([target]), stage_layers, p, n)[0]
    avg = (2 * p + 2 * counts[0] + 2 * counts[1] + 2 * counts[2]) / n
    assert abs(avg - target) <= 1.0
    assert np.all(np.diff(counts) <= 0)  # a pyramid: each stage keeps at most what the one before kept


def test_fastv_counts_clip_at_what_the_first_layers_already_spend():
    # an average below layer * P / L cannot be reached by pruning before `layer`: FastV keeps nothing after it
    assert ev.fastv_counts(np.array([10.0]), 2, 144, 8)[0, 0] == 0


def fake_results(atp_acc=0.8, unpruned_acc=0.82, baseline_acc=0.6, text_only=0.3, atp_fraction=0.3,
                 best_baseline=None, atp_prefill_ms=4.0):
    kinds = ("color", "count")

    def method(model, name, acc, frac):
        return {"model": model, "method": name, "accuracy": acc, "per_kind": dict.fromkeys(kinds, acc),
                "avg_visual_tokens": 144 * frac, "visual_token_fraction": frac, "flops_ratio": frac,
                "prefill_ms": 10.0 * frac}

    methods = {rp.ATP: method("ATP-tuned", "ATP", atp_acc, atp_fraction) | {"prefill_ms": atp_prefill_ms}}
    methods[rp.ATP]["budget_spread"] = {"min": 0.1, "median": 0.3, "max": 0.6}
    for model_key, model_name in rp.MODELS:
        methods[f"{model_key}/unpruned"] = method(model_name, "unpruned", unpruned_acc, 1.0)
        for key, name in rp.BASELINES:
            methods[f"{model_key}/{key}"] = method(model_name, name, baseline_acc, atp_fraction)
    if best_baseline is not None:
        methods["before_atp/pdrop"]["accuracy"] = best_baseline
    guesser = {"method": "text-only guesser", "accuracy": text_only, "per_kind": dict.fromkeys(kinds, text_only)}
    return {"methods": methods, "text_only": guesser, "num_visual_tokens": 144, "test_questions": 10,
            "targets": rp.targets(methods, guesser)}


def test_targets_say_which_are_met():
    ok = fake_results()["targets"]
    assert all(t["met"] for t in ok.values()), ok
    bad = fake_results(atp_acc=0.7, baseline_acc=0.75, text_only=0.78, atp_fraction=0.4, atp_prefill_ms=5.6)["targets"]
    assert not any(t["met"] for t in bad.values()), bad
    assert bad["atp_keeps_accuracy"]["value"] == pytest.approx(0.7 / 0.82)
    slow = bad["atp_prefill_time"]
    assert slow["value"] == pytest.approx(0.56) and slow["limit"] == pytest.approx(0.55)
    one_better = fake_results(atp_acc=0.8, best_baseline=0.81)["targets"]["atp_beats_every_baseline"]
    assert not one_better["met"] and one_better["best"] == "before_atp/pdrop"  # the best row, whichever model
    assert one_better["value"] == pytest.approx(-0.01) and len(one_better["per_row"]) == 6


def test_atp_is_held_against_the_model_before_atp_tuning():
    results = fake_results(atp_acc=0.78)
    results["methods"]["before_atp/unpruned"]["accuracy"] = 0.9  # the tuned model's unpruned row stays at 0.82
    kept = rp.targets(results["methods"], results["text_only"])["atp_keeps_accuracy"]
    assert kept["value"] == pytest.approx(0.78 / 0.9) and not kept["met"]


def test_budget_spread():
    run = ev.MethodRun(predictions=[], visual_per_layer=np.array([[144, 14.4], [144, 72], [144, 144]], float),
                       counts=np.zeros((3, 1)), kept=[])
    assert rp.budget_spread(run, 144) == pytest.approx({"min": 0.55, "median": 0.75, "max": 1.0})


def test_table_and_plot(tmp_path):
    results = fake_results()
    text = rp.table(results)
    assert "text-only guesser" in text and "PyramidDrop" in text and "MISSED" not in text
    assert "43.2 (30%)" in text and "before ATP" in text and "ATP-tuned" in text
    assert "min 0.100, median 0.300, max 0.600" in text
    lines = text.splitlines()
    rows = [line.split()[:3] for line in lines[3:12]]  # after the head, the rule and the guesser
    assert all(r[:2] == ["before", "ATP"] for r in rows[:4]) and rows[4] == ["ATP-tuned", "ATP", "0.800"]
    assert all(r[0] == "ATP-tuned" for r in rows[4:])
    path = rp.plot(results, tmp_path / "plot.png")
    from PIL import Image

    assert Image.open(path).size[0] > 300
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temporary file left behind


@pytest.mark.slow
def test_the_main_job_end_to_end_on_a_tiny_chain(tmp_path):
    """Two short stages of the tiny test model, then the report: every file and field is there."""
    cache = tmp_path / "cache"
    args = [sys.executable, str(ROOT / "launch" / "train.py"), f"--workdir={tmp_path / 'run'}",
            f"--config={ROOT / 'tests' / 'chain_config.py'}", f"--config.data.cache_dir={cache}"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    results = json.loads((run / "eval_results.json").read_text())
    rows = {f"{model}/{method}" for model in ("before_atp", "atp_tuned")
            for method in ("unpruned", "fastv", "pdrop", "random")}
    assert set(results["methods"]) == rows | {"atp_tuned/atp"}
    for m in results["methods"].values():
        assert set(m) >= {"accuracy", "avg_visual_tokens", "flops_ratio", "per_kind", "prefill_ms"}
        assert set(m["per_kind"]) == {"color", "count", "exist", "position"}
    full, atp = results["methods"]["before_atp/unpruned"], results["methods"]["atp_tuned/atp"]
    assert full["avg_visual_tokens"] == results["num_visual_tokens"] and full["flops_ratio"] == pytest.approx(1.0)
    for key in rows - {"before_atp/unpruned", "atp_tuned/unpruned"}:  # the baselines run at ATP's budget
        assert abs(results["methods"][key]["avg_visual_tokens"] - atp["avg_visual_tokens"]) <= 1.5, key
    assert results["models"]["before_atp"].endswith("pretrain/model")  # the model the ATP stage started from
    spread = atp["budget_spread"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert "text-only guesser" in proc.stdout and "accuracy" in proc.stdout
    assert (run / "accuracy_vs_tokens.png").stat().st_size > 0
    assert len(list((run / "visualizations").glob("*.png"))) == 2
    for stage in ("pretrain", "atp"):
        assert (run / stage / "model" / "atp_config.json").is_file()
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "skipped" in again.stderr  # finished stages are not trained again




def test_paired_stderr():
    a = np.array([1, 1, 0, 0] * 25)
    assert rp.paired_stderr(a, a) == 0
    b = np.array([1, 0, 1, 0] * 25)  # differs on half the questions, by +1 or -1
    assert rp.paired_stderr(a, b) == pytest.approx(np.sqrt(0.5 / 99))  # sample variance 50/99 over n = 100


def test_pruning_modules_save_and_load_through_a_relative_path(tmp_path, monkeypatch):
    import jax
    from flax import nnx

    from atp_jax.models.config import LlavaConfig
    from atp_jax.models.llava import LlavaForConditionalGeneration
    from atp_jax.pruning.checkpoint import load_pruned, save_pruning
    from atp_jax.pruning.config import PruningConfig
    from atp_jax.pruning.engine import PrunedLlava

    cfg = LlavaConfig.tiny()
    llava = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    model = PrunedLlava(llava, PruningConfig(atp_layers=(0,)), rngs=nnx.Rngs(3))
    monkeypatch.chdir(tmp_path)
    Path("ckpt").mkdir()
    save_pruning("ckpt", model)  # orbax wants absolute paths: relative ones must still work
    loaded, trained = load_pruned("ckpt", llava, rngs=nnx.Rngs(9))
    assert trained
    same = jax.tree.map(np.array_equal, nnx.to_pure_dict(nnx.state(model.thresholds)),
                        nnx.to_pure_dict(nnx.state(loaded.thresholds)))
    assert all(jax.tree.leaves(same))
