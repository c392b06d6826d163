"""The main job's report: every method on the shapes test split, the text-only guesser, the targets, and the
files it leaves in the workdir (`eval_results.json`, `accuracy_vs_tokens.png`, `visualizations/`)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
from flax import nnx

from atp_jax.data import synthetic
from atp_jax.eval import shapes as ev
from atp_jax.fileio import atomic_path, atomic_write_text
from atp_jax.pruning.engine import PrunedLlava

RESULTS_FILE = "eval_results.json"
PLOT_FILE = "accuracy_vs_tokens.png"
VIS_DIR = "visualizations"
BASELINES = (("fastv", "FastV"), ("pdrop", "PyramidDrop"), ("random", "random"))
# The two models every row runs on: the model before ATP tuning (what training-free baselines are published on,
# and the unpruned reference) and the ATP-tuned one (its language model was tuned under ATP's masks).
MODELS = (("before_atp", "before ATP"), ("atp_tuned", "ATP-tuned"))
# Targets of the comparison: ATP at most this fraction of the visual tokens on average ...
MAX_TOKEN_FRACTION = 0.35
KEEP_ACCURACY = 0.95  # ... keeps at least this share of the reference's unpruned accuracy, beats every baseline row,
CLEAR_MARGIN = 0.10  # and the reference beats the text-only guesser by this much on every question kind.
# ATP's compact prefill takes at most its FLOPs ratio plus this share of the unpruned prefill's time: its scoring
# side path and the compactions are work the FLOPs count leaves out.
PREFILL_ALLOWANCE = 0.15
ATP = "atp_tuned/atp"
REFERENCE = "before_atp/unpruned"


def log(message: str) -> None:
    print(message, flush=True)


@dataclasses.dataclass
class Comparison:
    results: dict  # what eval_results.json holds
    test: ev.TestSet
    runs: dict[str, ev.MethodRun]  # row key ("<model>/<method>") -> its answers and kept tokens


def budget_spread(run: ev.MethodRun, num_visual: int) -> dict:
    """Min, median and max over the test questions of each one's kept fraction of the visual tokens (its average
    over the decoder layers): how far ATP's per-instance budgets spread around their mean."""
    fraction = run.visual_per_layer.mean(axis=1) / num_visual
    return {"min": float(fraction.min()), "median": float(np.median(fraction)), "max": float(fraction.max())}


def compare(model_dir: str | os.PathLike, reference_dir: str | os.PathLike, shapes: synthetic.ShapesConfig,
            test_size: int, batch_size: int, timing_batch: int) -> Comparison:
    """Answers the test split with ATP (the trained thresholds in `model_dir`), and on both the model before ATP
    tuning (`reference_dir`) and the ATP-tuned one: the unpruned model and the ranked baselines at ATP's
    per-instance budget."""
    from atp_jax.convert.checkpoint import load_pretrained
    from atp_jax.data.tokenizer import load_tokenizer
    from atp_jax.pruning.checkpoint import load_pruned

    tuned, cfg = load_pretrained(model_dir)
    reference, reference_cfg = load_pretrained(reference_dir)
    if reference_cfg != cfg:
        raise ValueError(f"{reference_dir} holds another architecture than {model_dir}")
    tokenizer = load_tokenizer(model_dir)
    atp, trained = load_pruned(model_dir, tuned, method="atp")
    if not trained:
        raise ValueError(f"{model_dir} has no trained ATP thresholds")
    test = ev.build_test_set(shapes, tokenizer, cfg.image_token_index, cfg.num_image_tokens, cfg.vision.image_size,
                             limit=test_size)
    log(f"evaluating on {len(test)} test questions ...")
    methods, runs = {}, {}

    timed = {}  # row key -> the model and counts its prefill is timed with, after every row has answered

    def run(key: str, model_name: str, name: str, model: PrunedLlava, counts=None) -> None:
        start = time.perf_counter()
        runs[key] = ev.answer_all(model, test, tokenizer, batch_size, counts)
        methods[key] = {"model": model_name} | ev.method_result(name, runs[key], test, model)
        timed[key] = (model, counts)
        log(f"  {model_name} {name}: accuracy {methods[key]['accuracy']:.3f} at "
            f"{methods[key]['avg_visual_tokens']:.1f} visual tokens ({time.perf_counter() - start:.0f} s)")

    run(ATP, "ATP-tuned", "ATP", atp)
    methods[ATP] |= {"kept_per_module": runs[ATP].counts.mean(0).tolist(), "module_layers": list(atp.module_layers),
                     "budget_spread": budget_spread(runs[ATP], cfg.num_image_tokens)}
    for (model_key, model_name), llava in zip(MODELS, (reference, tuned), strict=True):
        run(f"{model_key}/unpruned", model_name, "unpruned",
            PrunedLlava(llava, dataclasses.replace(atp.pcfg, method="none"), rngs=nnx.Rngs(0)))
        for key, name in BASELINES:
            model = ev.baseline_model(llava, key, atp.pcfg)
            run(f"{model_key}/{key}", model_name, name, model, ev.counts_at_budget(model, runs[ATP]))
    log(f"timing every row's compact prefill of {min(timing_batch, len(test))} questions, in turns ...")
    for key, seconds in ev.prefill_seconds(timed, test, timing_batch).items():
        methods[key]["prefill_ms"] = 1000 * seconds
    correct = {k: ev.correct(test, r.predictions) for k, r in runs.items()}
    train = (synthetic.sample("train", i, shapes) for i in range(shapes.train_size))
    tests = (synthetic.sample("test", i, shapes) for i in range(len(test)))
    guesser = synthetic.text_only_baseline(train, tests)
    text_only = {"method": "text-only guesser", "accuracy": guesser["all"]["accuracy"],
                 "per_kind": {k: v["accuracy"] for k, v in guesser.items() if k != "all"},
                 "chance": {k: v["chance"] for k, v in guesser.items()}}
    stderr = {k: paired_stderr(correct[ATP], c) for k, c in correct.items() if is_baseline(k)}
    results = {"test_questions": len(test), "num_visual_tokens": cfg.num_image_tokens,
               "decoder_layers": cfg.text.num_hidden_layers, "timing_batch": min(timing_batch, len(test)),
               "models": {"before_atp": str(reference_dir), "atp_tuned": str(model_dir)},
               "methods": methods, "text_only": text_only, "targets": targets(methods, text_only, stderr)}
    return Comparison(results, test, runs)


def is_baseline(key: str) -> bool:
    return key.split("/")[-1] in dict(BASELINES)


def paired_stderr(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a) - mean(b) for per-question 0/1 scores of two methods on the same questions."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def targets(methods: dict, text_only: dict, stderr: dict | None = None) -> dict:
    """Each target of the comparison with its measured figures and whether it is met. ATP is held against the
    model before ATP tuning (unpruned) and against the best baseline row at its budget, whichever model that ran
    on, and its compact prefill time against that unpruned row's. `stderr`: per baseline row, the standard error
    of ATP's accuracy minus the row's."""
    atp, full = methods[ATP], methods[REFERENCE]
    baselines = {k: m for k, m in methods.items() if is_baseline(k)}
    best = max(baselines, key=lambda k: baselines[k]["accuracy"])
    margins = {k: full["per_kind"][k] - text_only["per_kind"][k] for k in text_only["per_kind"]}
    beats = {"value": atp["accuracy"] - baselines[best]["accuracy"], "limit": 0.0,
             "met": atp["accuracy"] > baselines[best]["accuracy"], "best": best,
             "name": f"{baselines[best]['model']} {baselines[best]['method']}",
             "per_row": {k: atp["accuracy"] - m["accuracy"] for k, m in baselines.items()}}
    if stderr is not None:
        beats["stderr"] = stderr[best]
    time_ratio = atp["prefill_ms"] / full["prefill_ms"]
    time_limit = atp["flops_ratio"] + PREFILL_ALLOWANCE
    return {
        "atp_token_fraction": {"value": atp["visual_token_fraction"], "limit": MAX_TOKEN_FRACTION,
                               "met": atp["visual_token_fraction"] <= MAX_TOKEN_FRACTION},
        "atp_keeps_accuracy": {"value": atp["accuracy"] / max(full["accuracy"], 1e-9), "limit": KEEP_ACCURACY,
                               "met": atp["accuracy"] >= KEEP_ACCURACY * full["accuracy"]},
        "atp_beats_every_baseline": beats,
        "unpruned_beats_text_only": {"value": min(margins.values()), "limit": CLEAR_MARGIN, "per_kind": margins,
                                     "met": min(margins.values()) >= CLEAR_MARGIN},
        "atp_prefill_time": {"value": time_ratio, "limit": time_limit, "met": time_ratio <= time_limit},
    }


def table(results: dict) -> str:
    """The comparison as a plain-text table, the targets, and the spread of ATP's per-instance budgets."""
    methods = results["methods"]
    kinds = sorted(results["text_only"]["per_kind"])
    head = ["model", "method", "accuracy", *kinds, "visual tokens", "FLOPs ratio", "prefill ms"]
    rows = [head]
    t = results["text_only"]
    rows.append(["-", t["method"], f"{t['accuracy']:.3f}", *(f"{t['per_kind'][k]:.3f}" for k in kinds), "-", "-",
                 "-"])
    order = [k for k, _ in MODELS]  # the reference model's rows first, ATP first among the tuned model's
    for key in sorted(methods, key=lambda k: (order.index(k.split("/")[0]), k != ATP)):
        m = methods[key]
        rows.append([m["model"], m["method"], f"{m['accuracy']:.3f}", *(f"{m['per_kind'][k]:.3f}" for k in kinds),
                     f"{m['avg_visual_tokens']:.1f} ({100 * m['visual_token_fraction']:.0f}%)",
                     f"{m['flops_ratio']:.3f}", f"{m['prefill_ms']:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    spread = methods[ATP].get("budget_spread")
    if spread:
        lines += ["", "ATP's per-instance budget (kept fraction of the visual tokens, averaged over the decoder "
                      f"layers) over the {results['test_questions']} test questions: min {spread['min']:.3f}, median "
                      f"{spread['median']:.3f}, max {spread['max']:.3f}"]
    lines.append("")
    for name, target in results["targets"].items():
        extra = f", standard error {target['stderr']:.3f}" if "stderr" in target else ""
        against = f" over {target['name']}" if "name" in target else ""
        lines.append(f"{'met   ' if target['met'] else 'MISSED'}  {name}: {target['value']:.3f}{against} "
                     f"(limit {target['limit']:.2f}{extra})")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """Accuracy against average visual tokens, one point per method, the text-only guesser as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    markers = iter("osD^vphX<>")  # the baselines share ATP's budget: distinct markers keep overlapping points apart
    for key, m in results["methods"].items():
        marker = "*" if key == ATP else next(markers)
        ax.scatter(m["avg_visual_tokens"], m["accuracy"], s=110 if marker == "*" else 55, marker=marker, zorder=3,
                   alpha=0.85, label=f"{m['model']} {m['method']} ({m['accuracy']:.3f})")
    ax.axhline(results["text_only"]["accuracy"], color="grey", linestyle="--",
               label=f"text-only guesser ({results['text_only']['accuracy']:.3f})")
    ax.set_xlabel(f"average visual tokens per decoder layer (of {results['num_visual_tokens']})")
    ax.set_ylabel(f"exact-match accuracy ({results['test_questions']} test questions)")
    ax.set_xlim(0, results["num_visual_tokens"] * 1.08)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def visualize(comparison: Comparison, shapes: synthetic.ShapesConfig, directory: Path, count: int) -> list[Path]:
    """Pictures of ATP's kept patches per module for the first `count` test images."""
    from PIL import Image

    from atp_jax.infer.visualize import draw_kept

    directory.mkdir(parents=True, exist_ok=True)
    test, run = comparison.test, comparison.runs[ATP]
    grid = int(round(np.sqrt(comparison.results["num_visual_tokens"])))
    layers = comparison.results["methods"][ATP]["module_layers"]
    paths = []
    for i in range(min(count, len(test))):
        image = Image.fromarray(synthetic.sample("test", test.indices[i], shapes)["image"])
        paths.append(draw_kept(image, run.kept[i], grid, layers, directory / f"test_{i:03d}_atp.png"))
    return paths


def write_json(results: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def report(model_dir, reference_dir, workdir, shapes: synthetic.ShapesConfig, test_size: int, batch_size: int,
           timing_batch: int, visualizations: int) -> dict:
    """Runs the comparison and writes its files into `workdir`; prints the table; returns the results."""
    workdir = Path(workdir)
    comparison = compare(model_dir, reference_dir, shapes, test_size, batch_size, timing_batch)
    results = comparison.results
    write_json(results, workdir / RESULTS_FILE)
    plot(results, workdir / PLOT_FILE)
    visualize(comparison, shapes, workdir / VIS_DIR, visualizations)
    log("\n" + table(results))
    log(f"\nwrote {workdir / RESULTS_FILE}, {workdir / PLOT_FILE} and {workdir / VIS_DIR}/")
    return results
