"""The tiny model's tokenizer and text encoder.

The tokenizer is a real `CLIPTokenizer` (byte-pair encoding, vocab.json + merges.txt) whose
vocabulary is built from the caption words, with merges that assemble each word into a
single token. The text encoder is a small `CLIPTextModel` trained from scratch together
with the teacher; Stable Diffusion style pipelines read its last hidden state.
"""

from __future__ import annotations

import json
from pathlib import Path

from instaflow.tiny.prompts import vocabulary

MAX_LENGTH = 24
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARS = "abcdefghijklmnopqrstuvwxyz,:"


def _word_merges(word: str) -> list[tuple[str, str]]:
    parts = [*word[:-1], word[-1] + "</w>"]
    merges, prefix = [], parts[0]
    for part in parts[1:]:
        merges.append((prefix, part))
        prefix += part
    return merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merge loop: repeatedly merge the adjacent pair of lowest rank."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Single characters (word-inner and word-final '</w>' symbols), then merges that grow
    every word left to right into one token. A word that another word's merges would split
    gets its merges moved to the front, until every word is one token."""
    order = list(words)
    for _ in range(len(words)):
        merges = list(dict.fromkeys(m for word in order for m in _word_merges(word)))
        ranks = {pair: i for i, pair in enumerate(merges)}
        split = [w for w in order if len(_bpe(w, ranks)) > 1]
        if not split:
            break
        order = split + [w for w in order if w not in split]
    symbols = [s for ch in CHARS for s in (ch, ch + "</w>")]
    symbols += list(dict.fromkeys(a + b for a, b in merges))
    vocab = {token: i for i, token in enumerate(dict.fromkeys(symbols + [BOS, EOS]))}
    return vocab, [f"{a} {b}" for a, b in merges]


def save_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(vocabulary())
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def text_encoder_config(vocab_size: int, tokenizer) -> "object":
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tokenize(tokenizer, prompts: list[str]):
    """Token ids exactly as the engine makes them (padded to max length, no attention mask)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids
