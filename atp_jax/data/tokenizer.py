"""Tokenizers: load a LLaMA-style transformers tokenizer from a local directory, or train a tiny one."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

from atp_jax.fileio import staged_directory

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


class TokenizerError(ValueError):
    pass


def load_tokenizer(directory: str | os.PathLike):
    """A transformers tokenizer from `directory` (tokenizer.json or a sentencepiece tokenizer.model with its
    tokenizer_config.json), local files only. LLaVA needs BOS: a tokenizer that does not add one is refused."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir() or not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise TokenizerError(f"{directory}: no tokenizer here (expected tokenizer.json or tokenizer.model)")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a broken directory
        raise TokenizerError(f"{directory}: cannot load the tokenizer: {e}") from e
    if tok.bos_token_id is None or tok("a")["input_ids"][:1] != [tok.bos_token_id]:
        raise TokenizerError(f"{directory}: the tokenizer adds no BOS (set add_bos_token in tokenizer_config.json)")
    if tok.eos_token_id is None:
        raise TokenizerError(f"{directory}: the tokenizer has no EOS token")
    return tok


def train_tokenizer(texts: Iterable[str], directory: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Trains a LLaMA-style sentencepiece BPE (byte fallback, split digits, `<unk>`/`<s>`/`</s>` = 0/1/2, a dummy
    prefix) on `texts` and writes it with a tokenizer_config.json that adds BOS and the llava-hf extra tokens
    `<image>` and `<pad>` after the vocabulary. Deterministic for the same texts. Returns the directory.

    Written to a temporary directory and renamed into place, so an interrupted run leaves nothing half-done.
    """
    import sentencepiece as spm

    with staged_directory(directory) as staging:
        model = io.BytesIO()  # not model_prefix: the file would record that (temporary) path
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", character_coverage=1.0, num_threads=1, minloglevel=2)
        (staging / "tokenizer.model").write_bytes(model.getvalue())
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "legacy": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "pad_token": PAD_TOKEN, "extra_special_tokens": [IMAGE_TOKEN],
                  "added_tokens_decoder": {
                      str(vocab_size): {"content": IMAGE_TOKEN, "special": True, "lstrip": False, "rstrip": False,
                                        "normalized": False, "single_word": False},
                      str(vocab_size + 1): {"content": PAD_TOKEN, "special": True, "lstrip": False, "rstrip": False,
                                            "normalized": False, "single_word": False}}}
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return Path(directory)
