"""LLaVA-1.5 conversations (atp_jax.data.conversation) and tokenizers (atp_jax.data.tokenizer).

Everything is checked against independent re-implementations of the original LLaVA recipe: the prompt text
(`Conversation.get_prompt` for SeparatorStyle.TWO and PLAIN, `preprocess_multimodal`), the token ids
(`tokenizer_image_token` from llava/mm_utils.py) and the supervised spans (decoded back to the answers), with
two tokenizers: a tiny sentencepiece BPE trained here, and the real 32000-piece LLaMA-style vocabulary shipped
in the mistral-common wheel.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from atp_jax.data import conversation as C
from atp_jax.data.conversation import IGNORE_INDEX, SampleError
from atp_jax.data.tokenizer import TokenizerError, load_tokenizer, train_tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
TINY_VOCAB = 400
LLAMA_IMAGE_ID = 32000  # llava-hf convention: the first id after the 32000-piece vocabulary


# ----------------------------------------------------------------------------------------------------------------
# tokenizers

def _corpus() -> list[str]:
    subjects = ["the cat", "a dog", "two birds", "my friend", "the old man", "a red car", "the small boat",
                "three children"]
    verbs = ["sits on", "looks at", "runs past", "jumps over", "waits near", "drives to"]
    objects = ["the table", "a green tree", "the river", "an open window", "the blue house", "a wooden bench"]
    texts = [f"{s.capitalize()} {v} {o}." for s, v, o in itertools.product(subjects, verbs, objects)]
    texts += [f"How many {o.split()[-1]}s are there? There are {n} of them."
              for o, n in zip(objects, (7, 20, 33, 46, 59, 72), strict=True)]
    texts += [SYSTEM, "USER: What is in the picture? ASSISTANT: A cat.", "Describe the image in detail.",
              "What color is the car? It is red, and it is parked near the house.",
              "The answer is 42; the question is unknown!", "Il y a un café à Paris."]
    return texts


@dataclasses.dataclass(frozen=True)
class Tok:
    name: str
    tok: object
    image_id: int
    directory: Path


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> Tok:
    directory = train_tokenizer(_corpus(), tmp_path_factory.mktemp("tiny_tok") / "tiny", vocab_size=TINY_VOCAB)
    return Tok("tiny", load_tokenizer(directory), TINY_VOCAB, directory)


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory) -> Tok:
    mistral_common = pytest.importorskip("mistral_common")
    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    directory = tmp_path_factory.mktemp("llama_tok")
    shutil.copy(model, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = load_tokenizer(directory)
    assert len(tok) == 32000
    return Tok("llama", tok, LLAMA_IMAGE_ID, directory)


@pytest.fixture(params=["tiny", "llama"])
def tk(request) -> Tok:
    return request.getfixturevalue(f"{request.param}_tok")


# ----------------------------------------------------------------------------------------------------------------
# independent references (the original LLaVA code, transcribed)

def llava_preprocess_multimodal(turns: list[dict]) -> list[dict]:
    """llava/train/train.py preprocess_multimodal (mm_use_im_start_end False), after dropping a leading gpt turn
    as preprocess_v1 does (`if roles[source[0]["from"]] != conv.roles[0]: source = source[1:]`)."""
    turns = [dict(t) for t in turns]
    if turns and turns[0]["from"] != "human":
        turns = turns[1:]
    for t in turns:
        if "<image>" in t["value"]:
            t["value"] = t["value"].replace("<image>", "").strip()
            t["value"] = ("<image>" + "\n" + t["value"]).strip()
    return turns


def llava_prompt_vicuna_v1(turns: list[dict]) -> str:
    """Conversation.get_prompt for conv_vicuna_v1 (SeparatorStyle.TWO, sep ' ', sep2 '</s>')."""
    seps = [" ", "</s>"]
    ret = SYSTEM + seps[0]
    for i, t in enumerate(turns):
        ret += {"human": "USER", "gpt": "ASSISTANT"}[t["from"]] + ": " + t["value"] + seps[i % 2]
    return ret


def llava_prompt_plain(turns: list[dict]) -> str:
    """preprocess_plain: the human turn becomes just `<image>`, then the caption and conv_plain's sep '\\n'."""
    return "<image>" + turns[1]["value"] + "\n"


def llava_tokenizer_image_token(prompt: str, tokenizer, image_token_index: int) -> list[int]:
    """llava/mm_utils.py tokenizer_image_token, verbatim apart from names."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x), strict=True) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand_images(ids: list[int], image_id: int, n: int) -> list[int]:
    out = []
    for i in ids:
        out += [i] * n if i == image_id else [i]
    return out


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each maximal run of True."""
    out, start = [], None
    for j, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            out.append((start, j))
            start = None
    return out


def decode(tk: Tok, ids) -> str:
    """Text of token ids, each run of image ids written as one `<image>`."""
    parts, text_ids = [], []
    ids = [int(i) for i in ids]
    for j, i in enumerate(ids):
        if i == tk.image_id:
            if j == 0 or ids[j - 1] != tk.image_id:
                parts.append(tk.tok.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
                parts.append("<image>")
                text_ids = []
        else:
            text_ids.append(i)
    parts.append(tk.tok.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return "".join(parts)


def nows(s: str) -> str:
    return "".join(s.split())


# ----------------------------------------------------------------------------------------------------------------
# conversations

def conv(*values: str, first: str = "human") -> list[dict]:
    roles = ("human", "gpt") if first == "human" else ("gpt", "human")
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


# name -> (turns, has_image); every one is valid for vicuna_v1, and those with one round and an image for plain
CASES = {
    "single": (conv("<image>\nWhat is in the picture?", "A cat sits on the table."), True),
    "digits_punct": (conv("<image>\nHow many birds? Count them!",
                          "There are 12 birds; 3 are red (maybe 4), and 1,250 feathers... right?"), True),
    "newlines": (conv("<image>\nDescribe it.", "First line.\nSecond line:\n- item one\n- item two"), True),
    "unicode": (conv("<image>\nWhere is this?", "It is a café in Zürich — très jolie ☕."), True),
    "spaces": (conv("<image>\nSay it with spaces.", "  leading and trailing spaces  "), True),
    "number": (conv("<image>\nHow many?", "42"), True),
    "emoji_first": (conv("<image>\nWhat drink?", "☕ Coffee, 3 cups.\n"), True),
    "image_at_end": (conv("What is this?\n<image>", "A wooden bench."), True),
    "image_mid": (conv("Look at\n<image>\nthis photo: what is it?", "A boat."), True),
    "multi4": (conv("<image>\nWhat animal is this?", "A dog.",
                    "What color is it?", "It is brown,\nwith white paws.",
                    "How many legs does it have?", "4",
                    "Is it happy?", " Yes, it looks happy! "), True),
    "text_only": (conv("What is 2 + 2?", "2 + 2 = 4.", "And 3 * 3?", "9"), False),
    "leading_gpt": (conv("ignored greeting", "<image>\nWhat is here?", "A river.", first="gpt"), True),
}
PLAIN_CASES = [k for k, (turns, has_image) in CASES.items()
               if has_image and len(llava_preprocess_multimodal(turns)) == 2]
VICUNA_PARAMS = [("vicuna_v1", k) for k in CASES]
ALL_PARAMS = VICUNA_PARAMS + [("plain", k) for k in PLAIN_CASES]


def answers_of(turns: list[dict]) -> list[str]:
    return [t["value"] for t in llava_preprocess_multimodal(turns) if t["from"] == "gpt"]


def reference_prompt(template: str, turns: list[dict]) -> str:
    normalised = llava_preprocess_multimodal(turns)
    return llava_prompt_vicuna_v1(normalised) if template == "vicuna_v1" else llava_prompt_plain(normalised)


# ----------------------------------------------------------------------------------------------------------------
# rendering

def test_render_vicuna_two_rounds_literal():
    turns = conv("What is this?\n<image>", "A cat.", "What color?", "Black and white.")
    rendered = C.render(turns, "vicuna_v1", has_image=True)
    expected = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? ASSISTANT: "
                "A cat.</s>USER: What color? ASSISTANT: Black and white.</s>")
    assert rendered.text == expected
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["A cat.</s>", "Black and white.</s>"]


def test_render_plain_literal():
    rendered = C.render(conv("Describe the image.\n<image>", "A red car near a tree."), "plain", has_image=True)
    assert rendered.text == "<image>A red car near a tree.\n"
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["A red car near a tree.\n"]


@pytest.mark.parametrize("template,case", ALL_PARAMS)
def test_render_matches_llava_prompt(template, case):
    turns, has_image = CASES[case]
    rendered = C.render(turns, template, has_image)
    assert rendered.text == reference_prompt(template, turns)
    suffix = "</s>" if template == "vicuna_v1" else "\n"
    assert [rendered.text[a:b] for a, b in rendered.spans] == [a + suffix for a in answers_of(turns)]


def test_generation_prompt_literals():
    head = SYSTEM + " USER: "
    assert C.generation_prompt("What is this?") == head + "<image>\nWhat is this? ASSISTANT:"
    assert C.generation_prompt("What is this?\n<image>") == head + "<image>\nWhat is this? ASSISTANT:"
    assert C.generation_prompt("<image>\nWhat is this?", has_image=True) == head + "<image>\nWhat is this? ASSISTANT:"
    assert C.generation_prompt("What is 2 + 2?", has_image=False) == head + "What is 2 + 2? ASSISTANT:"
    assert not C.generation_prompt("Hi").endswith(" ")
    with pytest.raises(SampleError) as e:
        C.generation_prompt("<image>\nWhat?", has_image=False)
    assert e.value.reason == "image_token_count"


def test_generation_prompt_is_the_training_prefix():
    """The inference prompt is exactly the training text up to (and excluding) the space before the answer."""
    question = "What is this?\n<image>"
    rendered = C.render(conv(question, "A cat."), "vicuna_v1", has_image=True)
    prompt = C.generation_prompt(question)
    assert rendered.text.startswith(prompt + " ")
    assert rendered.spans[0][0] == len(prompt) + 1


def test_image_moved_to_start_of_first_turn():
    assert C.normalise_turns(conv("What is this?\n<image>", "A cat."), True) == [
        ("human", "<image>\nWhat is this?"), ("gpt", "A cat.")]
    assert C.normalise_turns(conv("  What <image> is this?  ", "A cat."), True)[0] == (
        "human", "<image>\nWhat  is this?")
    # text-only turns are left exactly as written (no stripping)
    assert C.normalise_turns(conv(" hi ", " there "), False) == [("human", " hi "), ("gpt", " there ")]


def test_image_in_an_answer_is_rejected():
    with pytest.raises(SampleError) as e:
        C.render(conv("What is this?", "<image> A cat."), "vicuna_v1", has_image=True)
    assert e.value.reason == "image_token_count"


def test_image_in_a_later_question_moves_to_the_first():
    rendered = C.render(conv("Hi.", "Hello.", "<image>\nAnd now?", "A cat."), "vicuna_v1", has_image=True)
    assert rendered.text == SYSTEM + " USER: <image>\nHi. ASSISTANT: Hello.</s>USER: And now? ASSISTANT: A cat.</s>"


def test_leading_gpt_turn_dropped():
    turns = conv("I am a stray caption.", "<image>\nWhat is here?", "A river.", first="gpt")
    assert C.normalise_turns(turns, True) == [("human", "<image>\nWhat is here?"), ("gpt", "A river.")]
    assert C.render(turns, "vicuna_v1", True).text == C.render(turns[1:], "vicuna_v1", True).text
    assert "stray" not in C.render(turns, "vicuna_v1", True).text


# ----------------------------------------------------------------------------------------------------------------
# tokenization against LLaVA's tokenizer_image_token

@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("template,case", ALL_PARAMS)
def test_token_ids_match_llava(tk, template, case, n):
    turns, has_image = CASES[case]
    out = C.encode_sample(turns, tk.tok, template, has_image, tk.image_id, n)
    reference = llava_tokenizer_image_token(reference_prompt(template, turns), tk.tok, tk.image_id)
    assert out.input_ids.dtype == np.int32 and out.labels.dtype == np.int32
    assert out.input_ids.tolist() == expand_images(reference, tk.image_id, n)
    assert out.labels.shape == out.input_ids.shape
    assert out.num_images == int(has_image)


@pytest.mark.parametrize("template,case", ALL_PARAMS)
def test_supervised_spans_are_the_answers(tk, template, case):
    turns, has_image = CASES[case]
    out = C.encode_sample(turns, tk.tok, template, has_image, tk.image_id, 5)
    ids, labels = out.input_ids, out.labels
    supervised = labels != IGNORE_INDEX
    assert set(np.unique(labels[~supervised]).tolist()) <= {IGNORE_INDEX}
    np.testing.assert_array_equal(labels[supervised], ids[supervised])
    suffix = "</s>" if template == "vicuna_v1" else "\n"
    answers = answers_of(turns)
    spans = runs(supervised)
    assert len(spans) == len(answers)
    for (a, b), answer in zip(spans, answers, strict=True):
        assert decode(tk, ids[a:b]).lstrip() == (answer + suffix).lstrip()
        if template == "vicuna_v1":
            assert ids[b - 1] == tk.tok.eos_token_id
    # the first token is BOS and it is ignored; the last token is supervised (the final `</s>` or caption "\n")
    assert ids[0] == tk.tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert supervised[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_ignored_tokens_are_the_prompt(tk, case):
    """The ignored runs decode to BOS + system + `USER: q ASSISTANT:` (first), then `USER: q ASSISTANT:`."""
    turns, has_image = CASES[case]
    out = C.encode_sample(turns, tk.tok, "vicuna_v1", has_image, tk.image_id, 3)
    ignored = runs(out.labels == IGNORE_INDEX)
    questions = [t["value"] for t in llava_preprocess_multimodal(turns) if t["from"] == "human"]
    expected = [f"USER: {q} ASSISTANT:" for q in questions]
    expected[0] = "<s>" + SYSTEM + " " + expected[0]
    assert len(ignored) == len(expected)  # nothing ignored after the last `</s>`
    for (a, b), want in zip(ignored, expected, strict=True):
        assert nows(decode(tk, out.input_ids[a:b])) == nows(want)


@pytest.mark.parametrize("case", PLAIN_CASES)
def test_plain_supervises_everything_after_the_image(tk, case):
    """LLaVA's preprocess_plain ignores len(tokenizer_image_token('<image>')) tokens (BOS + image) and supervises
    the rest; with the image expanded that is BOS + n image tokens."""
    turns, has_image = CASES[case]
    n = 6
    out = C.encode_sample(turns, tk.tok, "plain", has_image, tk.image_id, n)
    assert out.input_ids[0] == tk.tok.bos_token_id
    assert out.input_ids[1:1 + n].tolist() == [tk.image_id] * n
    assert (out.labels[:1 + n] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(out.labels[1 + n:], out.input_ids[1 + n:])


@pytest.mark.parametrize("n", [1, 4, 576])
@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
def test_image_expansion(tk, template, n):
    turns, has_image = CASES["image_at_end"]
    out = C.encode_sample(turns, tk.tok, template, has_image, tk.image_id, n)
    where = np.flatnonzero(out.input_ids == tk.image_id)
    assert len(where) == n
    assert where.tolist() == list(range(where[0], where[0] + n))
    assert (out.labels[where] == IGNORE_INDEX).all()
    assert out.num_images == 1


def test_text_only_has_no_image_tokens(tk):
    out = C.encode_sample(CASES["text_only"][0], tk.tok, "vicuna_v1", False, tk.image_id, 9)
    assert not (out.input_ids == tk.image_id).any()
    assert out.num_images == 0


def test_llava_token_pattern_around_image(llama_tok):
    """The known LLaVA-1.5 pattern: `USER:` `▁` <image> `▁` `<0x0A>` (the chunk after the image keeps its dummy
    prefix), and a generation prompt that ends with the `:` of `ASSISTANT:` (no trailing `▁`)."""
    tk = llama_tok
    out = C.encode_sample(CASES["image_at_end"][0], tk.tok, "vicuna_v1", True, tk.image_id, 2)
    j = int(np.flatnonzero(out.input_ids == tk.image_id)[0])
    pieces = tk.tok.convert_ids_to_tokens(out.input_ids[j - 4:j].tolist() + out.input_ids[j + 2:j + 4].tolist())
    assert pieces == ["▁US", "ER", ":", "▁", "▁", "<0x0A>"]
    prompt_ids = llava_tokenizer_image_token(C.generation_prompt("What is this?"), tk.tok, tk.image_id)
    assert tk.tok.convert_ids_to_tokens(prompt_ids[-4:]) == ["▁ASS", "IST", "ANT", ":"]


# ----------------------------------------------------------------------------------------------------------------
# truncation (after image expansion)

N_IMG = 8


def _full(tk, case="single", template="vicuna_v1"):
    turns, has_image = CASES[case]
    return turns, has_image, C.encode_sample(turns, tk.tok, template, has_image, tk.image_id, N_IMG)


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
def test_truncation_into_answer_keeps_prefix(tk, template):
    turns, has_image, full = _full(tk, template=template)
    first = int(np.flatnonzero(full.labels != IGNORE_INDEX)[0])
    assert len(full.input_ids) - first >= 4
    for max_length in (first + 1, first + 3, len(full.input_ids) - 1):
        out = C.encode_sample(turns, tk.tok, template, has_image, tk.image_id, N_IMG, max_length=max_length)
        assert len(out.input_ids) == len(out.labels) == max_length
        np.testing.assert_array_equal(out.input_ids, full.input_ids[:max_length])
        np.testing.assert_array_equal(out.labels, full.labels[:max_length])
    for max_length in (len(full.input_ids), len(full.input_ids) + 10):
        out = C.encode_sample(turns, tk.tok, template, has_image, tk.image_id, N_IMG, max_length=max_length)
        np.testing.assert_array_equal(out.input_ids, full.input_ids)
        np.testing.assert_array_equal(out.labels, full.labels)


def test_truncation_multi_turn_keeps_whole_rounds_before_cut(tk):
    turns, has_image, full = _full(tk, "multi4")
    spans = runs(full.labels != IGNORE_INDEX)
    assert len(spans) == 4
    out = C.encode_sample(turns, tk.tok, "vicuna_v1", has_image, tk.image_id, N_IMG, max_length=spans[1][0])
    assert runs(out.labels != IGNORE_INDEX) == [spans[0]]
    np.testing.assert_array_equal(out.labels, full.labels[:spans[1][0]])


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
def test_truncation_into_image_drops_sample(tk, template):
    turns, has_image, full = _full(tk, template=template)
    start = int(np.flatnonzero(full.input_ids == tk.image_id)[0])
    for max_length in (1, start, start + 1, start + N_IMG - 1):
        with pytest.raises(SampleError) as e:
            C.encode_sample(turns, tk.tok, template, has_image, tk.image_id, N_IMG, max_length=max_length)
        assert e.value.reason == "image_too_long", max_length


def test_truncation_happens_after_expansion(tk):
    """A max_length the unexpanded sequence (one placeholder per image) fits in, but the expanded one does not."""
    turns, has_image = CASES["single"]
    unexpanded = len(llava_tokenizer_image_token(reference_prompt("vicuna_v1", turns), tk.tok, tk.image_id))
    n = 64
    with pytest.raises(SampleError) as e:  # the expanded image straddles the cut
        C.encode_sample(turns, tk.tok, "vicuna_v1", has_image, tk.image_id, n, max_length=unexpanded)
    assert e.value.reason == "image_too_long"
    out = C.encode_sample(turns, tk.tok, "vicuna_v1", has_image, tk.image_id, n, max_length=unexpanded + n - 1)
    assert len(out.input_ids) == unexpanded + n - 1
    assert (out.input_ids == tk.image_id).sum() == n


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
def test_truncation_before_answers(tk, template):
    turns, has_image, full = _full(tk, template=template)
    start = int(np.flatnonzero(full.input_ids == tk.image_id)[0])
    first = int(np.flatnonzero(full.labels != IGNORE_INDEX)[0])
    for max_length in sorted({start + N_IMG, first}):
        with pytest.raises(SampleError) as e:
            C.encode_sample(turns, tk.tok, template, has_image, tk.image_id, N_IMG, max_length=max_length)
        assert e.value.reason == "truncated_answers", max_length
    turns, has_image = CASES["text_only"]
    with pytest.raises(SampleError) as e:
        C.encode_sample(turns, tk.tok, "vicuna_v1", has_image, tk.image_id, N_IMG, max_length=5)
    assert e.value.reason == "truncated_answers"


# ----------------------------------------------------------------------------------------------------------------
# bad samples

BAD = {
    "empty": ([], True, "empty_conversation"),
    "only_gpt": (conv("<image>\nA caption.", first="gpt"), True, "empty_conversation"),
    "only_human": (conv("<image>\nWhat?"), True, "unanswered_turn"),
    "unanswered_last": (conv("<image>\nWhat?", "A cat.", "And?"), True, "unanswered_turn"),
    "empty_answer": (conv("<image>\nWhat?", ""), True, "empty_answer"),
    "whitespace_answer": (conv("<image>\nWhat?", "  \n\t "), True, "empty_answer"),
    "empty_later_answer": (conv("<image>\nWhat?", "A cat.", "And?", " "), True, "empty_answer"),
    "two_humans": ([{"from": "human", "value": "<image>\nWhat?"}, {"from": "human", "value": "Tell me."},
                    {"from": "gpt", "value": "A cat."}], True, "bad_roles"),
    "two_gpts": (conv("<image>\nWhat?", "A cat.") + conv("Again.", first="gpt"), True, "bad_roles"),
    "two_images_one_turn": (conv("<image>\n<image>\nWhat?", "A cat."), True, "image_token_count"),
    "two_images_two_turns": (conv("<image>\nWhat?", "A cat.", "<image>\nAnd?", "A dog."), True,
                             "image_token_count"),
    "image_in_answer": (conv("<image>\nWhat?", "A cat <image>."), True, "image_token_count"),
    "no_image_token": (conv("What?", "A cat."), True, "image_token_count"),
    "image_without_image": (conv("<image>\nWhat?", "A cat."), False, "image_token_count"),
    "unknown_role": ([{"from": "system", "value": "Be nice."}] + conv("<image>\nWhat?", "A cat."), True,
                     "bad_schema"),
    "value_none": ([{"from": "human", "value": None}, {"from": "gpt", "value": "A cat."}], True, "bad_schema"),
    "value_int": ([{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": 4}], True,
                  "bad_schema"),
    "missing_from": ([{"value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}], True, "bad_schema"),
    "not_a_dict": (["<image>\nWhat?", "A cat."], True, "bad_schema"),
}


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_samples_rejected(tiny_tok, case, template):
    turns, has_image, reason = BAD[case]
    with pytest.raises(SampleError) as e:
        C.encode_sample(turns, tiny_tok.tok, template, has_image, tiny_tok.image_id, 4)
    assert e.value.reason == reason
    assert str(e.value).startswith(reason + ":") and e.value.detail


def test_plain_needs_one_round_with_image(tiny_tok):
    with pytest.raises(SampleError) as e:
        C.encode_sample(CASES["multi4"][0], tiny_tok.tok, "plain", True, tiny_tok.image_id, 4)
    assert e.value.reason == "bad_schema"
    with pytest.raises(SampleError) as e:
        C.encode_sample(CASES["text_only"][0][:2], tiny_tok.tok, "plain", False, tiny_tok.image_id, 4)
    assert e.value.reason == "image_token_count"


def test_unknown_template(tiny_tok):
    with pytest.raises(ValueError, match="llava_v0"):
        C.encode_sample(CASES["single"][0], tiny_tok.tok, "llava_v0", True, tiny_tok.image_id, 4)
    with pytest.raises(ValueError, match="template"):
        C.render(CASES["single"][0], "chatml", True)


def test_inconsistent_spans_rejected(tk):
    """The masking guard: a span that cuts a token in two, or covers no token, is a SampleError."""
    text = SYSTEM + " USER: hi ASSISTANT: the cat sits on the table</s>"
    start = text.index("the cat")
    enc = tk.tok(text, return_offsets_mapping=True)
    cores = [(a + (text[a] == " "), b) for a, b in enc["offset_mapping"] if a + 1 >= start]  # without the "▁"
    middle = next(a + 1 for a, b in cores if b - a >= 2 and " " not in text[a:b])  # inside a token of 2+ chars
    with pytest.raises(SampleError) as e:
        C.tokenize(C.Rendered(text, ((middle, len(text)),)), tk.tok, tk.image_id, 4)
    assert e.value.reason == "label_mismatch"
    with pytest.raises(SampleError) as e:  # an empty span
        C.tokenize(C.Rendered(text, ((len(text), len(text)),)), tk.tok, tk.image_id, 4)
    assert e.value.reason == "label_mismatch"
    ok = C.tokenize(C.Rendered(text, ((start, len(text)),)), tk.tok, tk.image_id, 4)
    assert decode(tk, ok.input_ids[ok.labels != IGNORE_INDEX]).lstrip() == "the cat sits on the table</s>"


# ----------------------------------------------------------------------------------------------------------------
# tokenizer loading and training

def test_tiny_tokenizer_layout(tiny_tok):
    tok = tiny_tok.tok
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [TINY_VOCAB, TINY_VOCAB + 1]
    assert tok.pad_token_id == TINY_VOCAB + 1
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    assert tok("a")["input_ids"][-1] != tok.eos_token_id
    text = "Zürich ☕ 12345 naïve"  # byte fallback: any character round-trips
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_load_tokenizer_empty_or_missing_dir(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("source", ["tiny", "llama"])
def test_load_tokenizer_without_bos_refused(tmp_path, request, source):
    tk = request.getfixturevalue(f"{source}_tok")
    directory = tmp_path / "nobos"
    shutil.copytree(tk.directory, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="BOS"):
        load_tokenizer(directory)


def test_train_tokenizer_twice_refused(tiny_tok):
    directory = tiny_tok.directory
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    siblings = sorted(p.name for p in directory.parent.iterdir())
    with pytest.raises(FileExistsError):
        train_tokenizer(["completely different text"] * 20, directory, vocab_size=300)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(p.name for p in directory.parent.iterdir()) == siblings  # no staging directory left behind
    assert load_tokenizer(directory)("the cat").input_ids == tiny_tok.tok("the cat").input_ids


def _model_proto(directory: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((directory / "tokenizer.model").read_bytes())
    return proto


@pytest.fixture(scope="module")
def retrained(tiny_tok, tmp_path_factory) -> Path:
    return train_tokenizer(_corpus(), tmp_path_factory.mktemp("again") / "again", vocab_size=TINY_VOCAB)


def test_train_tokenizer_deterministic_vocabulary(tiny_tok, retrained):
    first, second = _model_proto(tiny_tok.directory), _model_proto(retrained)
    assert [(p.piece, p.score, p.type) for p in first.pieces] == [(p.piece, p.score, p.type) for p in second.pieces]
    config = "tokenizer_config.json"
    assert (tiny_tok.directory / config).read_text() == (retrained / config).read_text()
    text = "The old man drives to the blue house. 42 café"
    assert load_tokenizer(retrained)(text).input_ids == tiny_tok.tok(text).input_ids


def test_train_tokenizer_byte_identical(tiny_tok, retrained):
    assert (tiny_tok.directory / "tokenizer.model").read_bytes() == (retrained / "tokenizer.model").read_bytes()
