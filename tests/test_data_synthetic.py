"""The synthetic "shapes" VQA set: determinism, correct answers, rendering, balance, text-only baseline, vocab."""

import dataclasses
import hashlib
import re
from collections import Counter

import numpy as np
import pytest

from atp_jax.data import synthetic as syn
from atp_jax.data.synthetic import ShapesConfig

CFG = ShapesConfig(train_size=2000, val_size=50, test_size=1000)
DEFAULT_KINDS = tuple(k for k, _ in CFG.kind_weights)  # "place" is asked only when a config weights it
WORD = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


@pytest.fixture(scope="module")
def train():
    return list(syn.generate("train", CFG))


@pytest.fixture(scope="module")
def test_split():
    return list(syn.generate("test", CFG))


@pytest.fixture(scope="module")
def captions():
    return [syn.caption_sample("train", i, CFG) for i in range(300)]


def _question(s):
    human, gpt = s["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"].startswith("<image>\n")
    assert gpt["value"] == s["answer"]
    return human["value"][len("<image>\n"):]


def _find(scene, color, shape):
    found = [o for o in scene.objects if o.color == color and o.shape == shape]
    assert len(found) == 1, (color, shape, scene)
    return found[0]


def _expected_answer(s):
    """Recompute the answer from the scene objects, independently of the generator's own bookkeeping."""
    q, objs = _question(s), s["scene"].objects
    shapes, colors = CFG.shapes, CFG.color_names
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        hits = [o for o in objs if o.shape == m[1]]
        assert len(hits) == 1, "colour questions ask about a shape that occurs once"
        return "color", hits[0].color
    if q == "How many objects are there?":
        return "count", syn.NUMBER_WORDS[len(objs)]
    if m := re.fullmatch(r"How many (\w+) objects are there\?", q):
        assert m[1] in colors
        return "count", syn.NUMBER_WORDS[sum(o.color == m[1] for o in objs)]
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        shape = {s + "s": s for s in shapes} | {"crosses": "cross"}
        return "count", syn.NUMBER_WORDS[sum(o.shape == shape[m[1]] for o in objs)]
    if m := re.fullmatch(r"Is there (a|an) (\w+) (\w+)\?", q):
        assert m[1] == ("an" if m[2][0] in "aeiou" else "a")
        return "exist", "yes" if any(o.color == m[2] and o.shape == m[3] for o in objs) else "no"
    if m := re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q):
        a, b = _find(s["scene"], m[1], m[2]), _find(s["scene"], m[3], m[4])
        dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
        # the asked axis is clearly dominant and the boxes are apart on it, with a margin
        main, other = (dx, dy) if abs(dx) > abs(dy) else (dy, dx)
        assert abs(main) >= 2 * abs(other)
        assert abs(main) >= a.size // 2 + b.size // 2 and abs(main) >= 0.2 * CFG.image_size
        if abs(dx) > abs(dy):
            return "position", "left" if dx < 0 else "right"
        return "position", "above" if dy < 0 else "below"
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        a, centre = _find(s["scene"], m[1], m[2]), (CFG.image_size - 1) / 2
        dx, dy = a.center[0] - centre, a.center[1] - centre
        # the object is clearly off the image's centre on a dominant axis, its box clear of the centre line
        main, other = (dx, dy) if abs(dx) > abs(dy) else (dy, dx)
        assert abs(main) >= 2 * abs(other)
        assert abs(main) >= a.size // 2 and abs(main) >= 0.2 * CFG.image_size
        if abs(dx) > abs(dy):
            return "place", "left" if dx < 0 else "right"
        return "place", "above" if dy < 0 else "below"
    raise AssertionError(f"unexpected question {q!r}")


def test_config_validation():
    for bad in (dict(min_objects=0), dict(min_objects=3, max_objects=2), dict(max_size=0.6),
                dict(shapes=("circle",)), dict(shapes=("circle", "circle")), dict(colors=(("Red", (1, 2, 3)),) * 2),
                dict(kind_weights=(("bogus", 1.0),)), dict(max_objects=1, min_objects=1),
                dict(count_weights=(0.0, 0.0, 0.0)), dict(train_size=-1), dict(position_max_objects=1),
                dict(position_max_objects=5),
                dict(shapes=("circle", "square"), colors=(("red", (255, 0, 0)), ("blue", (0, 0, 255))))):
        with pytest.raises(ValueError):
            ShapesConfig(**bad)
    with pytest.raises(ValueError):
        syn.sample("dev", 0, CFG)
    with pytest.raises(ValueError):
        syn.sample("train", 0, CFG, kind="other")
    assert CFG.split_size("test") == 1000 and {CFG.split_seed(s) for s in syn.SPLITS} == {0, 1, 2}


def test_the_set_is_pinned():
    """The questions, answers and scenes of the first samples of every kind and split, with the place kind
    weighted too, hashed: a change to the generator that changes the data (which must bump the TFDS builder's
    VERSION) fails here. The value was computed before the question kinds became one table, and again after."""
    h = hashlib.sha256()
    place = ShapesConfig(kind_weights=tuple((k, 1.0) for k in syn.KINDS))
    for cfg in (ShapesConfig(), place):
        for kind in ("vqa", "multi", "caption"):
            for split in ("train", "test"):
                for i in range(60):
                    s = syn.sample(split, i, cfg, kind)
                    h.update(repr((s.get("conversations"), s.get("caption"), s.get("answer"), s.get("kind"),
                                   s.get("subkind"), s["scene"])).encode())
    assert h.hexdigest()[:16] == "264ea58a19cb30db"


def test_determinism():
    for kind in ("vqa", "caption"):
        for i in (0, 7, 123):
            a, b = syn.sample("train", i, CFG, kind), syn.sample("train", i, CFG, kind)
            assert a["image"].tobytes() == b["image"].tobytes()
            assert a["conversations"] == b["conversations"] and a["scene"] == b["scene"]
        train = [syn.sample("train", i, CFG, kind)["image"].tobytes() for i in range(20)]
        val = [syn.sample("val", i, CFG, kind)["image"].tobytes() for i in range(20)]
        assert len(set(train)) == 20 and not set(train) & set(val)
    small = dataclasses.replace(CFG, val_size=12)
    gen = list(syn.generate("val", small))
    assert len(gen) == 12
    for i, s in enumerate(gen):
        alone = syn.sample("val", i, small)
        assert s["id"] == alone["id"] == f"shapes-val-{i:06d}"
        assert s["image"].tobytes() == alone["image"].tobytes() and s["conversations"] == alone["conversations"]
    caps = list(syn.generate("val", small, kind="caption"))
    assert [c["id"] for c in caps] == [f"shapes-cap-val-{i:06d}" for i in range(12)]
    assert all(c["caption"] == syn.caption_sample("val", i, small)["caption"] for i, c in enumerate(caps))
    # a sample does not depend on the split's size
    assert syn.sample("val", 3, dataclasses.replace(CFG, val_size=5))["conversations"] == gen[3]["conversations"]


def test_schema(train, captions):
    s = train[0]
    assert set(s) == {"id", "image", "conversations", "kind", "subkind", "answer", "scene"}
    assert s["image"].dtype == np.uint8 and s["image"].shape == (224, 224, 3)
    c = captions[0]
    assert c["conversations"] == [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": c["caption"]}]
    assert c["image"].shape == (224, 224, 3)
    for s in train[:300]:
        assert len(s["answer"].split()) == 1 and s["kind"] in syn.KINDS


def test_answers_are_correct(train):
    kinds = Counter()
    for s in train[:800]:
        kind, answer = _expected_answer(s)
        assert s["kind"] == kind and s["answer"] == answer, (s["id"], _question(s), s["answer"], s["scene"])
        kinds[kind] += 1
    assert all(kinds[k] > 100 for k in DEFAULT_KINDS) and set(kinds) == set(DEFAULT_KINDS), kinds


def test_scene_constraints(train, captions):
    lo, hi = CFG.min_size * CFG.image_size, CFG.max_size * CFG.image_size
    gap = CFG.min_gap * CFG.image_size
    for s in train[:500] + captions:
        objs = s["scene"].objects
        assert CFG.min_objects <= len(objs) <= CFG.max_objects
        assert len({(o.shape, o.color) for o in objs}) == len(objs), "each (shape, colour) at most once"
        assert s["scene"].background in CFG.backgrounds
        for o in objs:
            assert lo - 1 <= o.size <= hi + 1
            x0, y0, x1, y1 = o.box
            assert 0 < x0 and 0 < y0 and x1 < CFG.image_size - 1 and y1 < CFG.image_size - 1
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                need = a.size // 2 + b.size // 2 + gap
                assert abs(a.center[0] - b.center[0]) >= need or abs(a.center[1] - b.center[1]) >= need


def test_rendering(train, captions):
    coverage = []
    for s in train[:300] + captions[:100]:
        img, scene = s["image"], s["scene"]
        bg = np.array(scene.background, np.uint8)
        inside = np.zeros(img.shape[:2], bool)
        for o in scene.objects:
            x, y = o.center
            assert tuple(img[y, x]) == CFG.rgb(o.color), (s["id"], o)
            x0, y0, x1, y1 = o.box
            inside[y0:y1 + 1, x0:x1 + 1] = True
            box = img[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3)
            allowed = {CFG.rgb(o.color), tuple(scene.background)}
            assert {tuple(p) for p in np.unique(box, axis=0)} <= allowed, "no anti-aliasing or other colours"
        assert (img[~inside] == bg).all(), "background everywhere outside the objects' boxes"
        mask = syn.object_mask(scene, CFG)
        assert ((mask >= 0) == (img != bg).any(-1)).all()
        for i, o in enumerate(scene.objects):
            assert (img[mask == i] == CFG.rgb(o.color)).all()
        coverage.append((img != bg).any(-1).mean())
    coverage = np.array(coverage)
    print(f"object coverage: mean {coverage.mean():.3f}, min {coverage.min():.3f}, max {coverage.max():.3f}")
    assert 0.02 < coverage.mean() < 0.25 and coverage.max() < 0.3 and coverage.min() > 0


def test_balance():
    for kind, answers in (("exist", ("yes", "no")), ("position", syn.DIRECTIONS), ("place", syn.DIRECTIONS)):
        cfg = dataclasses.replace(CFG, kind_weights=((kind, 1.0),))
        got = Counter(syn.sample("train", i, cfg)["answer"] for i in range(1000))
        assert set(got) == set(answers)
        if kind == "exist":
            assert 0.45 <= got["yes"] / 1000 <= 0.55, got
        else:
            assert all(0.2 <= got[a] / 1000 <= 0.3 for a in answers), got


def test_position_scenes_can_be_limited_to_fewer_objects():
    full = dataclasses.replace(CFG, kind_weights=(("position", 1.0),))
    two = dataclasses.replace(full, position_max_objects=2)
    sizes = {cfg: Counter(len(syn.sample("train", i, cfg)["scene"].objects) for i in range(300)) for cfg in (full, two)}
    assert set(sizes[full]) == {2, 3, 4} and set(sizes[two]) == {2}
    s = syn.sample("train", 7, two)
    a, b = s["scene"].objects[:2]
    assert syn.relation(a, b) == s["answer"]
    # the later turns of a conversation ask about position only in scenes that small too
    mixed = dataclasses.replace(CFG, position_max_objects=2)
    asked = Counter()
    for i in range(200):
        m = syn.multi_sample("train", i, mixed)
        for turn in m["conversations"][2::2]:
            if "relative to" in turn["value"]:
                asked[len(m["scene"].objects)] += 1
    assert asked[2] > 0 and set(asked) == {2}


def test_place_questions_ask_where_an_object_is_in_the_image():
    """Where an object is in the image: answered from the scene, balanced, in scenes of any size, and asked in
    multi-turn conversations when weighted."""
    place = dataclasses.replace(CFG, kind_weights=(("place", 1.0),))
    sizes = Counter()
    for i in range(300):
        s = syn.sample("train", i, place)
        assert (s["kind"], s["answer"]) == _expected_answer(s) and s["subkind"] == "place"
        sizes[len(s["scene"].objects)] += 1
    assert set(sizes) == {1, 2, 3, 4}
    mixed = dataclasses.replace(CFG, kind_weights=(("color", 1.0), ("place", 1.0)))
    asked = Counter()
    for i in range(100):
        m = syn.multi_sample("train", i, mixed)
        for human, gpt in zip(m["conversations"][2::2], m["conversations"][3::2], strict=True):
            one = {**m, "conversations": [{"from": "human", "value": "<image>\n" + human["value"]}, gpt],
                   "answer": gpt["value"]}
            kind, expected = _expected_answer(one)
            assert gpt["value"] == expected
            asked[kind] += 1
    assert asked["place"] > 50 and asked["color"] > 50, asked
    assert syn.answers(place)["place"] == syn.DIRECTIONS


def test_answer_distributions(train):
    possible = syn.answers(CFG)
    assert possible["count"] == ("zero", "one", "two", "three", "four") and possible["exist"] == ("yes", "no")
    for kind in DEFAULT_KINDS:
        got = Counter(s["answer"] for s in train if s["kind"] == kind)
        n = sum(got.values())
        assert set(got) == set(possible[kind]), (kind, got)
        assert max(got.values()) / n < 0.6 if kind == "exist" else max(got.values()) / n < 0.35, (kind, got)
    # per question string: "How many objects are there?" is flat over 1..4, exist strings are balanced
    total = Counter(s["answer"] for s in train if _question(s) == "How many objects are there?")
    assert set(total) == {"one", "two", "three", "four"} and max(total.values()) / sum(total.values()) < 0.35
    subkinds = Counter(s["subkind"] for s in train if s["kind"] == "exist")
    assert set(subkinds) == {"positive", "binding", "shape", "random"}, subkinds
    kinds = Counter(s["kind"] for s in train)
    assert all(0.2 < kinds[k] / len(train) < 0.3 for k in DEFAULT_KINDS), kinds


def test_text_only_baseline_is_near_chance(train, test_split):
    res = syn.text_only_baseline(train, test_split)
    print({k: (round(v["accuracy"], 3), round(v["chance"], 3)) for k, v in res.items()})
    assert set(res) == set(DEFAULT_KINDS) | {"all"}
    for kind in DEFAULT_KINDS:
        assert res[kind]["n"] > 150
        assert res[kind]["chance"] == pytest.approx(1 / len(syn.answers(CFG)[kind]))
        assert res[kind]["accuracy"] <= res[kind]["chance"] + 0.1, (kind, res[kind])


def test_text_only_baseline_guesser():
    """The guesser itself works: it is perfect on text-determined answers and falls back to the kind's mode."""
    def s(q, a, kind="color"):
        return {"conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
                "answer": a, "kind": kind}

    train = [s("q1", "red"), s("q1", "red"), s("q1", "blue"), s("q2", "green"), s("q3", "green"),
             s("q4", "green")]  # kind mode: green
    test = [s("q1", "red"), s("q2", "green"), s("unseen", "green"), s("unseen", "blue")]
    res = syn.text_only_baseline(train, test)
    assert res["color"]["accuracy"] == 0.75 and res["color"]["chance"] == pytest.approx(1 / 3)
    assert res["color"]["majority"] == 0.5 and res["all"]["n"] == 4


def test_captions(captions):
    for c in captions:
        objs = sorted(c["scene"].objects, key=lambda o: o.center)
        words = [f"{o.color} {o.shape}" for o in objs]
        assert re.sub(r"\b(an?|An?|and)\b|[,.]", " ", c["caption"]).split() == " ".join(words).split()
        assert c["caption"][0].isupper() and c["caption"].endswith(".")
        assert ("and" in c["caption"].split()) == (len(objs) > 1)


def test_all_text_covers_every_word(train, captions):
    texts = list(syn.all_text(CFG))
    assert len(texts) == len(set(texts))
    vocab = {w for t in texts for w in WORD.findall(t)}
    used = set()
    for s in train[:400]:
        used |= set(WORD.findall(_question(s))) | {s["answer"]}
    for c in captions:
        used |= set(WORD.findall(c["caption"]))
    assert used <= vocab, used - vocab
    for kind_answers in syn.answers(CFG).values():
        assert set(kind_answers) <= set(texts)
    assert syn.place_question(("red", "circle")) in texts
    assert {"crosses", "An", "an", "?", ".", ","} <= vocab
    assert len(vocab) < 60, sorted(vocab)


def test_multi_turn_samples_ask_distinct_questions_answered_from_the_scene():
    from collections import Counter

    answers = Counter()
    for i in range(300):
        s = syn.sample("train", i, CFG, kind="multi")
        single = syn.sample("train", i, CFG)
        turns = s["conversations"]
        assert turns[:2] == single["conversations"] and s["scene"] == single["scene"]  # the vqa sample comes first
        assert len(turns) == 2 * CFG.turns and [t["from"] for t in turns] == ["human", "gpt"] * CFG.turns
        questions = [t["value"] for t in turns[2::2]]
        assert len(set(questions)) == len(questions) and all("<image>" not in q for q in questions)
        for human, gpt in zip(turns[2::2], turns[3::2], strict=True):
            one = {**s, "conversations": [{"from": "human", "value": "<image>\n" + human["value"]}, gpt],
                   "answer": gpt["value"]}
            kind, expected = _expected_answer(one)
            assert gpt["value"] == expected, (s["id"], human["value"], gpt["value"])
            answers[kind, expected] += 1
    exist = answers["exist", "yes"] / (answers["exist", "yes"] + answers["exist", "no"])
    assert 0.35 < exist < 0.65, answers
    a, b = syn.sample("train", 7, CFG, kind="multi"), syn.sample("train", 7, CFG, kind="multi")
    assert a["conversations"] == b["conversations"] and (a["image"] == b["image"]).all()
