"""The data path end to end: TFDS builders (no TensorFlow), the grain pipeline, sharding, resume, bad input."""

import dataclasses
import io
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from atp_jax.data import synthetic
from atp_jax.data.builders import LlavaConfig, LlavaInstruct, decode_record, shapes_data
from atp_jax.data.conversation import IGNORE_INDEX, SampleError
from atp_jax.data.pipeline import DataConfig, Preprocess, make_loader
from atp_jax.data.sources import AnnotationSource, SkipReport
from atp_jax.data.tokenizer import load_tokenizer, train_tokenizer
from atp_jax.train.data import shapes_kind

SHAPES = dataclasses.replace(synthetic.ShapesConfig(), image_size=56, train_size=48, val_size=8, test_size=8)
DATA = DataConfig(image_size=56, max_length=96)
P = 16  # image tokens


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    data_dir, tokenizer_dir = shapes_data(cache, SHAPES)
    return cache, data_dir, tokenizer_dir


def preprocess(tokenizer_dir, **kw) -> Preprocess:
    tok = load_tokenizer(tokenizer_dir)
    return Preprocess(str(tokenizer_dir), tok.convert_tokens_to_ids("<image>"), P, dataclasses.replace(DATA, **kw))


def source(data_dir, split="train", config="vqa"):
    return tfds.data_source(f"shapes_vqa/{config}", data_dir=str(data_dir), split=split)


def test_shapes_are_prepared_once_per_config(shapes):
    cache, data_dir, tokenizer_dir = shapes
    train = source(data_dir)
    assert len(train) == 48 and len(source(data_dir, "test")) == 8 and len(source(data_dir, "train", "caption")) == 48
    record = decode_record(train[0])
    want = synthetic.sample("train", int(record["id"].rsplit("-", 1)[1]), SHAPES)
    assert record["conversations"] == want["conversations"] and record["kind"] == want["kind"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(record["image"]))), want["image"])
    stamp = sorted(p.stat().st_mtime_ns for p in data_dir.rglob("*.array_record*"))
    assert shapes_data(cache, SHAPES) == (data_dir, tokenizer_dir)  # cached: nothing regenerated
    assert sorted(p.stat().st_mtime_ns for p in data_dir.rglob("*.array_record*")) == stamp
    other = shapes_data(cache, dataclasses.replace(SHAPES, train_size=8))
    assert other[0] != data_dir  # another generator config never reads this cache


def test_a_stage_prepares_only_the_config_it_reads(shapes):
    cache, data_dir, tokenizer_dir = shapes
    larger = dataclasses.replace(SHAPES, min_size=0.3, max_size=0.4)
    only, only_tokenizer = shapes_data(cache, larger, kinds=("caption",))
    assert sorted(p.name for p in (only / "shapes_vqa").iterdir() if not p.name.startswith(".")) == ["caption"]
    assert len(source(only, "train", "caption")) == 48
    # object sizes are not words: both configs train the same tokenizer, so the stages of a chain can mix them
    assert (only_tokenizer / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    with pytest.raises(ValueError, match="unknown shapes_vqa configs"):
        shapes_data(cache, larger, kinds=("captions",))


@pytest.mark.parametrize("name, kind", [("shapes_vqa/caption", "caption"), ("shapes_vqa/multi:1.2.0", "multi"),
                                        ("shapes_vqa", "vqa"), ("shapes_vqa:1.2.0", "vqa")])
def test_source_names_pick_the_shapes_config(name, kind):
    assert shapes_kind(name) == kind


def test_an_unknown_shapes_config_is_named():
    with pytest.raises(ValueError, match="shapes_vqa/captions"):
        shapes_kind("shapes_vqa/captions")


def test_batches_have_one_shape_and_supervise_only_answers(shapes):
    _, data_dir, tokenizer_dir = shapes
    pre = preprocess(tokenizer_dir)
    batches = list(make_loader(source(data_dir), pre, batch_size=4, num_epochs=1, shuffle=False))
    assert len(batches) == 12 and pre.report.total == 0
    tok = load_tokenizer(tokenizer_dir)
    image_id = tok.convert_tokens_to_ids("<image>")
    for batch in batches:
        assert batch["input_ids"].shape == (4, 96) and batch["pixel_values"].shape == (4, 3, 56, 56)
        assert (batch["input_ids"] == image_id).sum(1).tolist() == [P] * 4
        assert batch["has_image"].all()
    records = [decode_record(source(data_dir)[i]) for i in range(4)]
    for row, record in enumerate(records):  # unshuffled: batch 0 holds records 0..3
        labels = batches[0]["labels"][row]
        supervised = labels[labels != IGNORE_INDEX]
        assert tok.decode(supervised).strip() == record["conversations"][1]["value"] + "</s>"
        n = batches[0]["length"][row]
        assert batches[0]["attention_mask"][row].sum() == n and (labels[n:] == IGNORE_INDEX).all()


def test_processes_read_disjoint_shards_of_one_shuffle(shapes):
    _, data_dir, tokenizer_dir = shapes
    ids = []
    for index in range(2):
        loader = make_loader(source(data_dir), preprocess(tokenizer_dir), batch_size=2, seed=3, shard_index=index,
                             shard_count=2, num_epochs=1)
        ids.append({row.tobytes() for batch in loader for row in batch["pixel_values"]})  # every image differs
    assert len(ids[0]) == len(ids[1]) == 24 and not ids[0] & ids[1]


def test_a_resumed_iterator_sees_the_batches_it_would_have_seen(shapes, tmp_path):
    import grain

    _, data_dir, tokenizer_dir = shapes

    def loader():
        return make_loader(source(data_dir), preprocess(tokenizer_dir), batch_size=4, seed=7)

    it = iter(loader())
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it)["input_ids"] for _ in range(14)]  # crosses the epoch boundary (12 batches an epoch)
    fresh = iter(loader())
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.restore(manager.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["input_ids"], want)


def test_length_buckets_trim_each_batch(shapes):
    _, data_dir, tokenizer_dir = shapes
    pre = preprocess(tokenizer_dir, length_buckets=(64, 80, 96))
    for batch in make_loader(source(data_dir), pre, batch_size=4, num_epochs=1):
        length = batch["input_ids"].shape[1]
        assert length in (64, 80, 96) and batch["length"].max() <= length
        assert length == 64 or batch["length"].max() > {80: 64, 96: 80}[length]
    with pytest.raises(ValueError, match="processes"):
        make_loader(source(data_dir), pre, batch_size=4, shard_count=2)


# ---- bad input: a LLaVA-Instruct annotation file with every kind of problem ---------------------------------


def png(path, size=(20, 12)):
    Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    text = [*synthetic.all_text(SHAPES), "What is in the image? A cat sits on a mat. Describe it."] * 3
    from atp_jax.data.conversation import template_text

    return train_tokenizer(text + template_text(), tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    (root / "img").mkdir()
    png(root / "img" / "good.png")
    (root / "img" / "corrupt.png").write_bytes(b"not an image at all")
    png(root / "img" / "full.png")
    data = (root / "img" / "full.png").read_bytes()
    (root / "img" / "truncated.png").write_bytes(data[: len(data) // 2])

    def conv(q, a):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]

    entries = [
        {"id": "good", "image": "img/good.png", "conversations": conv("<image>\nWhat is in the image?", "A cat.")},
        {"id": "text-only", "conversations": conv("Describe a cat.", "A cat sits on a mat.")},
        {"id": "missing", "image": "img/nope.png", "conversations": conv("<image>\nWhat?", "A cat.")},
        {"id": "corrupt", "image": "img/corrupt.png", "conversations": conv("<image>\nWhat?", "A cat.")},
        {"id": "truncated", "image": "img/truncated.png", "conversations": conv("<image>\nWhat?", "A cat.")},
        {"id": "schema", "image": "img/good.png", "conversations": "What?"},
        {"id": "empty", "image": "img/good.png", "conversations": []},
        {"id": "unanswered", "image": "img/good.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]},
        {"id": "empty-answer", "image": "img/good.png", "conversations": conv("<image>\nWhat?", "  ")},
        {"id": "two-images", "image": "img/good.png", "conversations": conv("<image>\n<image>\nWhat?", "A cat.")},
        {"id": "no-image-token", "image": "img/good.png", "conversations": conv("What?", "A cat.")},
        {"id": "long", "image": "img/good.png", "conversations": conv("<image>\n" + "Describe it. " * 40, "A cat.")},
        "not an object",
    ]
    (root / "annotations.json").write_text(json.dumps(entries))
    return root


EXPECTED_SKIPS = {"bad_image": 3, "bad_schema": 2, "empty_conversation": 1, "unanswered_turn": 1, "empty_answer": 1,
                  "image_token_count": 2}


def test_bad_samples_are_skipped_and_counted_by_the_pipeline(messy, tokenizer_dir):
    report = SkipReport()
    src = AnnotationSource(messy / "annotations.json", messy, report)
    pre = preprocess(tokenizer_dir, max_length=256)
    kept = list(make_loader(src, pre, batch_size=1, num_epochs=1, shuffle=False))
    report.merge(pre.report)
    assert len(kept) == 2  # good and text-only
    assert kept[1]["has_image"].tolist() == [False] and (kept[1]["pixel_values"] == 0).all()
    assert dict(report.counts) == {**EXPECTED_SKIPS, "truncated_answers": 1}  # "long": the answer is cut off
    assert "missing" in report.ids["bad_image"] and "bad_image: 3 (e.g. 'missing'" in report.summary()


def test_strict_mode_raises_on_the_first_bad_sample(messy, tokenizer_dir):
    src = AnnotationSource(messy / "annotations.json", messy, SkipReport())
    pre = preprocess(tokenizer_dir, max_length=256, strict=True)
    with pytest.raises(SampleError, match="missing"):
        list(make_loader(src, pre, batch_size=1, num_epochs=1, shuffle=False))
    with pytest.raises(SampleError, match="bad_schema"):
        AnnotationSource(messy / "annotations.json", messy, SkipReport(strict=True))


def test_image_that_does_not_fit_is_dropped(messy, tokenizer_dir):
    src = AnnotationSource(messy / "annotations.json", messy, SkipReport())
    pre = preprocess(tokenizer_dir, max_length=40)  # BOS + system prompt + 16 image tokens do not fit in 40
    list(make_loader(src, pre, batch_size=1, num_epochs=1, shuffle=False))
    assert pre.report.counts["image_too_long"] >= 1


def test_tfds_llava_builder_skips_bad_samples_when_preparing(messy, tmp_path):
    config = LlavaConfig(name="messy", annotation="annotations.json", image_dir=".")
    builder = LlavaInstruct(config=config, data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(messy)))
    records = [decode_record(r) for r in builder.as_data_source(split="train")]
    assert sorted(r["id"] for r in records) == ["good", "long", "text-only"]  # "long" fails only at max_length
    good = next(r for r in records if r["id"] == "good")
    assert good["image"] == (messy / "img" / "good.png").read_bytes()
    assert next(r for r in records if r["id"] == "text-only")["image"] is None


def test_malformed_annotation_files_name_the_line(tmp_path):
    from atp_jax.data.sources import read_annotations

    (tmp_path / "a.jsonl").write_text('{"id": 1, "conversations": []}\n{"id": 2, oops}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_annotations(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text('[{"id": 1},\n {"id": 2,]')
    with pytest.raises(ValueError, match="line 2"):
        read_annotations(tmp_path / "b.json")
    with pytest.raises(FileNotFoundError):
        read_annotations(tmp_path / "none.json")
