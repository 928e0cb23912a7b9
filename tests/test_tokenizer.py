"""The offline CLIP tokenizer: vocabulary derivation, ids, padding and masks.

Two oracles:
- ``CLIPTokenizerFast`` loaded by transformers from a folder laid out like
  ``openai/clip-vit-base-patch32`` (vocab.json, merges.txt, tokenizer_config.json and
  special_tokens_map.json with the official special tokens and length);
- CLIP's own BPE algorithm, written here from the merges file directly (independent of the
  derived vocab.json), on strings that need no ftfy/HTML repair (where the fast tokenizer and
  OpenAI's tokenizer agree by construction).
"""
import gzip
import html
import json
import os
from functools import lru_cache
from importlib import resources

import ftfy
import pytest
import regex
import torch
from transformers import CLIPTokenizerFast

import clipvip
from clipvip.tokenizer import bytes_to_unicode, write_vocab_files

SENTENCES = [
    "a man is singing on stage", "A woman slicing a tomato in the kitchen.", "two dogs run across a field",
    "someone is playing the guitar", "cartoon characters are talking", "a red square moves to the left",
    "The cat sat on the mat!!!", "people dancing at a party", "a car drives down the road at night",
    "kids playing basketball", "a chef explains how to cook pasta", "news anchor reports the weather",
    "a baby laughs", "the sun sets over the ocean", "a man rides a horse", "a girl is applying makeup",
    "soccer players celebrate a goal", "a person folds paper into a crane", "astronauts float in space",
    "a blue circle moving right", "don't stop", "it's a beautiful day", "we're going home", "they've won",
    "I'm here", "you'll see", "he'd know", "rock'n'roll", "state-of-the-art video-language model",
    "e-mail me at someone@example.com", "visit https://example.org/path?q=1", "C++ and C# and F#",
    "100% sure", "3.14159 is pi", "call 555-1234", "1st 2nd 3rd 4th", "12:30pm", "$5.99", "#hashtag @user",
    "    leading and trailing spaces    ", "multiple     spaces   between", "tabs\tand\nnewlines\r\nhere",
    "UPPERCASE SHOUTING", "MiXeD CaSe TeXt", "café naïve résumé façade", "Ünïcödé ÄÖÜ ß",
    "一个男人在唱歌", "日本語のテキスト", "한국어 문장", "Привет, мир", "Γειά σου Κόσμε", "مرحبا بالعالم",
    "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Xin chào thế giới", "😀", "a 😀 smiling face",
    "👍👍👍", "👩‍👩‍👧 family", "🇺🇸 flag", "❤️ love", "emoji at end 🎉", "∑ ∫ √ ∞ ≈ ≠",
    "em—dash and en–dash", "ellipsis…", "tilde ~ caret ^ pipe |",
    "back\\slash", "under_score", "semi;colon:colon", "(parentheses) [brackets] {braces}", "<angle>",
    "a" * 80, "ha" * 60, "word " * 100, "", " ", "\n", ".", "!?", "'", "''", "'s", "x", "7",
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "zero-width\u200bspace", "non\u00a0breaking space", "combining e\u0301 accent",
    "superscript x² y³", "roman Ⅻ", "circled ①②③", "tamil தமிழ்", "amharic ሰላም",
]
# Strings that OpenAI's ftfy/HTML clean-up rewrites (entities, mojibake, curly quotes, full-width
# letters, ligatures) and HF's fast tokenizer does not: compared with the official layout only.
FTFY_REPAIRED = ["fish &amp; chips", "&lt;tag&gt;", "caf\u00c3\u00a9", "Ã©", "“curly quotes” and ‘single’",
                 "fullwidth ＡＢＣ", "ligature ﬁ ﬂ"]


def all_strings():
    strings = list(SENTENCES)
    strings += [s.upper() for s in SENTENCES[:40]]
    strings += [f"{a} and {b}" for a, b in zip(SENTENCES[:40], SENTENCES[40:80])]
    strings += [s + " " + "😀" for s in SENTENCES[20:45]]
    return strings


@lru_cache(maxsize=None)
def official_layout_folder(root):
    """A folder laid out like openai/clip-vit-base-patch32's tokenizer files."""
    folder = os.path.join(root, "openai-layout")
    write_vocab_files(folder)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "model_max_length": 77, "do_lower_case": True, "errors": "replace",
                   "tokenizer_class": "CLIPTokenizer", "add_prefix_space": False}, f)
    return folder


@pytest.fixture(scope="module")
def ours():
    return clipvip.build_tokenizer(None)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return CLIPTokenizerFast.from_pretrained(official_layout_folder(str(tmp_path_factory.mktemp("tok"))))


class ReferenceCLIPBPE:
    """OpenAI CLIP's tokenizer algorithm, straight from the merges file."""

    PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                            r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def __init__(self):
        data = resources.files("clipvip").joinpath("assets", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
        merges = [tuple(m.split()) for m in gzip.decompress(data).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in self.PATTERN.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids


def test_suite_has_200_strings():
    assert len(all_strings()) >= 200


def test_vocabulary_anchors(ours):
    vocab = ours.get_vocab()
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert ours.pad_token_id == 49407 and ours.bos_token_id == 49406 and ours.eos_token_id == 49407
    assert ours.model_max_length == 77
    # well-known CLIP ids
    assert ours("a man is singing")["input_ids"] == [49406, 320, 786, 533, 5864, 49407]


@pytest.mark.parametrize("max_length", [77, 50, 12])
def test_equal_to_official_layout(ours, official, max_length):
    strings = all_strings() + FTFY_REPAIRED
    kwargs = dict(max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    a, b = ours(strings, **kwargs), official(strings, **kwargs)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    assert a["input_ids"].shape == (len(strings), max_length)


def test_equal_to_openai_bpe_algorithm(ours):
    reference = ReferenceCLIPBPE()
    for text in all_strings():
        expected = [49406] + reference.encode(text) + [49407]
        assert ours(text)["input_ids"] == expected, text


def test_padding_truncation_and_mask(ours):
    batch = ours(["a man", "", "word " * 200], max_length=10, padding="max_length", truncation=True,
                 return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0].tolist() == [49406, 320, 786, 49407] + [49407] * 6
    assert mask[0].tolist() == [1] * 4 + [0] * 6
    assert ids[1].tolist()[:2] == [49406, 49407] and mask[1].sum() == 2
    assert ids[2, 0] == 49406 and ids[2, -1] == 49407 and mask[2].sum() == 10  # EOS kept after truncation
    # EOS is the largest id, so argmax pooling finds it before any padding
    assert (ids.argmax(-1) == mask.sum(-1) - 1).all()


def test_clip_config_folder_tokenizer_is_used(tmp_path):
    folder = official_layout_folder(str(tmp_path))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({}, f)
    cfg = clipvip.load_config(None, ["--clip_config", folder])
    tokenizer = clipvip.build_tokenizer(cfg)
    assert os.path.samefile(tokenizer.name_or_path, folder)
    assert not os.path.samefile(clipvip.build_tokenizer(None).name_or_path, folder)


def test_licence_notice_ships_with_the_vocabulary():
    notice = resources.files("clipvip").joinpath("assets", "LICENSE-open_clip.txt").read_text()
    assert "Permission is hereby granted" in notice
