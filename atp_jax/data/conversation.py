"""LLaVA-1.5 conversations: templates, tokenization with `<image>` splicing, label masking, truncation.

The text is built as LLaVA builds it (docs/method.md, section 1) and split at each `<image>`; every chunk is
tokenized on its own and joined with image placeholders, as LLaVA's `tokenizer_image_token` does, so token
ids match the original recipe. Labels come from character spans instead of LLaVA's length arithmetic: a
token is supervised when it overlaps an answer span (the answer and its `</s>`, or a caption and its
`"\\n"`), and a sample whose tokens do not line up with those spans is rejected, never trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100
IMAGE = "<image>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")
ROLES = {"human": "USER", "gpt": "ASSISTANT"}


class SampleError(ValueError):
    """A sample that cannot be trained on; `reason` is a short key for counting (e.g. 'empty_answer')."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A conversation as one string and the character spans [start, stop) whose tokens are supervised."""

    text: str
    spans: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Tokenized:
    input_ids: np.ndarray  # int32[T], every image expanded to its image tokens
    labels: np.ndarray  # int32[T], IGNORE_INDEX where not supervised
    num_images: int


def normalise_turns(turns: Sequence[dict], has_image: bool) -> list[tuple[str, str]]:
    """(role, text) pairs that alternate human/gpt, with `<image>` moved to the start of the first human turn
    as `"<image>\n" + text`.

    A leading gpt turn is dropped (as LLaVA does); raises SampleError for an empty conversation, an unknown
    role, roles out of order, a human turn without an answer, an empty answer, an `<image>` count that
    differs from the number of images (0 or 1), or an `<image>` inside an answer.
    """
    pairs = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise SampleError("bad_schema", f"a turn must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r}")
        pairs.append((turn["from"], turn["value"]))
    if pairs and pairs[0][0] == "gpt":
        pairs = pairs[1:]
    if not pairs:
        raise SampleError("empty_conversation", "no human turn")
    for i, (role, _) in enumerate(pairs):
        if role != ("human", "gpt")[i % 2]:
            raise SampleError("bad_roles", f"turn {i} is {role!r}; turns must alternate human, gpt")
    if len(pairs) % 2:
        raise SampleError("unanswered_turn", "the last human turn has no answer")
    if any(not text.strip() for role, text in pairs if role == "gpt"):
        raise SampleError("empty_answer", "an answer is empty")
    count = sum(text.count(IMAGE) for _, text in pairs)
    if count != int(has_image):
        raise SampleError("image_token_count", f"{count} {IMAGE} in the text for {int(has_image)} image(s)")
    if any(IMAGE in text for role, text in pairs if role == "gpt"):
        raise SampleError("image_token_count", f"{IMAGE} in an answer")
    out = [(role, text.replace(IMAGE, "").strip() if IMAGE in text else text) for role, text in pairs]
    if has_image:
        out[0] = (out[0][0], (IMAGE + "\n" + out[0][1]).strip())
    return out


def render_vicuna_v1(turns: Sequence[tuple[str, str]]) -> Rendered:
    """`SYSTEM USER: q ASSISTANT: a</s>USER: ...`; spans cover each answer and its `</s>`."""
    text, spans = VICUNA_SYSTEM + " ", []
    for role, message in turns:
        text += ROLES[role] + ": "
        if role == "human":
            text += message + " "
        else:
            start = len(text)
            text += message + "</s>"
            spans.append((start, len(text)))
    return Rendered(text, tuple(spans))


def render_plain(turns: Sequence[tuple[str, str]]) -> Rendered:
    """Stage-1 captioning (`plain`): `<image>` then the caption and `"\\n"`; the caption and newline supervised."""
    if len(turns) != 2:
        raise SampleError("bad_schema", f"plain samples have one human and one gpt turn, got {len(turns)} turns")
    if IMAGE not in turns[0][1]:
        raise SampleError("image_token_count", f"plain samples need {IMAGE} in the human turn")
    caption = turns[1][1]
    return Rendered(IMAGE + caption + "\n", ((len(IMAGE), len(IMAGE) + len(caption) + 1),))


TEMPLATES = {"vicuna_v1": render_vicuna_v1, "plain": render_plain}


def render(turns: Sequence[dict], template: str, has_image: bool) -> Rendered:
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}: expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[template](normalise_turns(turns, has_image))


def template_text() -> list[str]:
    """The templates' own words (system prompt, roles), for training a tokenizer that covers them."""
    return [VICUNA_SYSTEM, *(f"{role}: " for role in ROLES.values())]


def generation_prompt(question: str, has_image: bool = True) -> str:
    """The `vicuna_v1` prompt for one question, ending in `ASSISTANT:` (no trailing space). A question without
    `<image>` gets one at its start when there is an image, as LLaVA's inference does."""
    if has_image and IMAGE not in question:
        question = IMAGE + "\n" + question
    turns = normalise_turns([{"from": "human", "value": question}, {"from": "gpt", "value": "x"}], has_image)
    return VICUNA_SYSTEM + " " + ROLES["human"] + ": " + turns[0][1] + " " + ROLES["gpt"] + ":"


def _chunk_tokens(tokenizer, chunk: str, offset: int, first: bool):
    enc = tokenizer(chunk, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(enc["input_ids"]), [(a + offset, b + offset) for a, b in enc["offset_mapping"]]
    if not first and ids and ids[0] == tokenizer.bos_token_id:  # later chunks lose their BOS, as in LLaVA
        ids, offsets = ids[1:], offsets[1:]
    return ids, offsets


def tokenize(rendered: Rendered, tokenizer, image_token_id: int, num_image_tokens: int,
             max_length: int | None = None) -> Tokenized:
    """Token ids and labels of a rendered conversation, each `<image>` expanded to `num_image_tokens` ids, then
    truncated to `max_length` (after expansion, as LLaVA does).

    Raises SampleError when the tokens do not line up with the answer spans ('label_mismatch': a token that
    mixes answer and non-answer text, an answer with no token, an answer not ending in EOS), when the image
    does not fit in `max_length` ('image_too_long'), or when truncation leaves nothing to learn
    ('truncated_answers').
    """
    if not getattr(tokenizer, "is_fast", True):
        raise TypeError("tokenize needs a tokenizer with offset mapping (a tokenizers-backed transformers tokenizer)")
    text = rendered.text
    ids, offsets, start = [], [], 0
    chunks = text.split(IMAGE)
    for i, chunk in enumerate(chunks):
        chunk_ids, chunk_offsets = _chunk_tokens(tokenizer, chunk, start, first=i == 0)
        ids += chunk_ids
        offsets += chunk_offsets
        if i < len(chunks) - 1:
            ids += [image_token_id] * num_image_tokens
            offsets += [(-1, -1)] * num_image_tokens  # no characters: never supervised
        start += len(chunk) + len(IMAGE)
    labels = [IGNORE_INDEX] * len(ids)
    for span_start, span_stop in rendered.spans:
        covering = [j for j, (a, b) in enumerate(offsets) if a < span_stop and b > span_start and b > a]
        for j in covering:
            a, b = offsets[j]
            outside = text[a:max(a, span_start)] + text[min(b, span_stop):b]
            if outside.strip():
                raise SampleError("label_mismatch", f"token {tokenizer.convert_ids_to_tokens(ids[j])!r} spans "
                                                    f"answer and prompt text {text[a:b]!r}")
            labels[j] = ids[j]
        if not covering:
            raise SampleError("label_mismatch", f"no token for the answer {text[span_start:span_stop]!r}")
        if text[span_start:span_stop].endswith("</s>") and ids[covering[-1]] != tokenizer.eos_token_id:
            raise SampleError("label_mismatch", f"answer {text[span_start:span_stop]!r} does not end in EOS")
    ids, labels = np.asarray(ids, np.int32), np.asarray(labels, np.int32)
    num_images = len(chunks) - 1
    if max_length is not None and len(ids) > max_length:
        if (ids[max_length:] == image_token_id).any():
            raise SampleError("image_too_long", f"{len(ids)} tokens with the image expanded; the image does not fit "
                                                f"in max_length {max_length}")
        ids, labels = ids[:max_length], labels[:max_length]
    if not (labels != IGNORE_INDEX).any():
        raise SampleError("truncated_answers", f"no supervised token left within max_length {max_length}")
    return Tokenized(ids, labels, num_images)


def encode_prompt(question: str, tokenizer, image_token_id: int, num_image_tokens: int,
                  has_image: bool = True) -> np.ndarray:
    """int32[T] ids of the `vicuna_v1` generation prompt for one question (ending in `ASSISTANT:`), the image
    expanded to `num_image_tokens` ids; `<image>` is inserted at the start when the question lacks it."""
    text = generation_prompt(question, has_image)
    ids, start = [], 0
    chunks = text.split(IMAGE)
    for i, chunk in enumerate(chunks):
        ids += _chunk_tokens(tokenizer, chunk, start, first=i == 0)[0]
        if i < len(chunks) - 1:
            ids += [image_token_id] * num_image_tokens
        start += len(chunk) + len(IMAGE)
    return np.asarray(ids, np.int32)


def encode_sample(turns: Sequence[dict], tokenizer, template: str, has_image: bool, image_token_id: int,
                  num_image_tokens: int, max_length: int | None = None) -> Tokenized:
    """render + tokenize: a LLaVA conversation (`[{'from', 'value'}, ...]`) to ids and labels."""
    return tokenize(render(turns, template, has_image), tokenizer, image_token_id, num_image_tokens, max_length)
