"""The offline CLIP tokenizer against open_clip's independent implementation, and loading from folders."""

from __future__ import annotations

import json

import pytest
import torch

from brainmclip.features import tokenizer as tok_module
from brainmclip.features.tokenizer import (
    CONTEXT_LENGTH,
    EOT_TOKEN,
    SOT_TOKEN,
    VOCAB_SIZE,
    build_clip_vocab,
    load_clip_tokenizer,
    tokenize,
)

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

LONG_CAPTION = " ".join(f"word{i} and a red balloon, number {i}!" for i in range(30))

CAPTIONS = [
    "a photo of a cat.",
    "A Photo Of A CAT",
    "A MAN RIDING A HORSE ON THE BEACH",
    "a man's dog isn't barking; they're sleeping, we've seen it, I'm sure, you'll see, he'd know",
    "Two dogs play frisbee in the park!!!",
    "what?! no... yes: maybe (probably) [surely] {never}",
    "a kitchen with 3 ovens, 12 chairs and 1,234.56 plates",
    "the year 2024 and the 1990s",
    "3D render of a 4x4 truck",
    "café au lait at the crème brûlée stand",
    "ÉCOLE NATIONALE and Straße",
    "e\u0301 combining accent vs é precomposed",
    "a dog 🐶 and a cat 🐱 on a sofa",
    "family 👩\u200d👩\u200d👧 emoji with joiners",
    "中文的标题 and 日本語のキャプション",
    "Привет, мир",
    "multiple    spaces   between\twords\nand lines",
    "   leading and trailing spaces   ",
    "non\u00a0breaking\u00a0space",
    "",
    "   ",
    "!",
    "tom &amp; jerry &lt;3",
    "curly \u2018quotes\u2019 and \u201cdouble\u201d ones",
    "mojibake cafÃ© text",
    "hyphen-ated words and under_scores and slashes/here",
    "email me@example.com or visit https://example.com/a?b=c",
    "a" * 200,
    LONG_CAPTION,
]


@pytest.fixture(scope="module")
def clip_tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def reference():
    return open_clip_tokenizer.SimpleTokenizer()


def _until_eos(row: torch.Tensor, eos_index: int) -> list[int]:
    return row[: eos_index + 1].tolist()


def test_vocabulary_size_and_special_tokens(clip_tokenizer):
    assert len(clip_tokenizer) == VOCAB_SIZE == 49408
    assert clip_tokenizer.convert_tokens_to_ids(SOT_TOKEN) == 49406
    assert clip_tokenizer.convert_tokens_to_ids(EOT_TOKEN) == 49407
    assert clip_tokenizer.bos_token_id == 49406
    assert clip_tokenizer.eos_token_id == 49407
    assert clip_tokenizer.pad_token_id == 49407
    assert clip_tokenizer.model_max_length == CONTEXT_LENGTH


def test_vocabulary_equals_open_clip(reference):
    vocab, merges = build_clip_vocab(tok_module._bpe_file())
    expected = dict(reference.encoder)
    # open_clip names the two special tokens differently; the ids are the same.
    expected[SOT_TOKEN] = expected.pop("<start_of_text>")
    expected[EOT_TOKEN] = expected.pop("<end_of_text>")
    assert vocab == expected
    assert merges == sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)


def test_ids_match_open_clip(clip_tokenizer, reference):
    ids, eos_index = tokenize(clip_tokenizer, CAPTIONS)
    ref_ids = reference(CAPTIONS, context_length=CONTEXT_LENGTH)
    assert ids.dtype == torch.long and eos_index.dtype == torch.long
    assert ids.shape == ref_ids.shape == (len(CAPTIONS), CONTEXT_LENGTH)
    assert eos_index.shape == (len(CAPTIONS),)
    ref_eos = ref_ids.argmax(dim=1)  # open_clip: the end token has the largest id; padding is 0
    for i, caption in enumerate(CAPTIONS):
        assert int(eos_index[i]) == int(ref_eos[i]), caption
        assert _until_eos(ids[i], int(eos_index[i])) == _until_eos(ref_ids[i], int(ref_eos[i])), caption
        # Padding after the end token is the end-of-text id, like the Hugging Face openai tokenizer.
        assert (ids[i, int(eos_index[i]) :] == 49407).all(), caption
    assert (ids[:, 0] == 49406).all()


def test_eos_index_is_first_eos_like_hf_clip_pooling(clip_tokenizer):
    ids, eos_index = tokenize(clip_tokenizer, ["a cat", "", "a much longer caption about a dog on a boat"])
    hf_pool = (ids == clip_tokenizer.eos_token_id).int().argmax(dim=-1)
    assert torch.equal(eos_index, hf_pool)
    assert eos_index.tolist()[1] == 1  # empty caption: start, end
    assert tokenize(clip_tokenizer, ["a photo of a cat"])[0][0, :6].tolist() == [49406, 320, 1125, 539, 320, 2368]


def test_long_caption_truncated_with_eos_last(clip_tokenizer, reference):
    assert len(reference.encode(LONG_CAPTION)) > CONTEXT_LENGTH
    ids, eos_index = tokenize(clip_tokenizer, [LONG_CAPTION, "a" * 200])
    assert eos_index[0].item() == CONTEXT_LENGTH - 1
    assert ids[0, -1].item() == 49407
    assert (ids[0, 1:-1] != 49407).all()
    assert ids[0, 1:-1].tolist() == reference.encode(LONG_CAPTION)[: CONTEXT_LENGTH - 2]


def test_other_context_length_and_empty_batch(clip_tokenizer, reference):
    ids, eos_index = tokenize(clip_tokenizer, CAPTIONS[:5] + [LONG_CAPTION], context_length=16)
    ref_ids = reference(CAPTIONS[:5] + [LONG_CAPTION], context_length=16)
    assert ids.shape == (6, 16)
    for i in range(6):
        assert _until_eos(ids[i], int(eos_index[i])) == _until_eos(ref_ids[i], int(ref_ids[i].argmax()))
    ids, eos_index = tokenize(clip_tokenizer, [])
    assert ids.shape == (0, CONTEXT_LENGTH) and eos_index.shape == (0,)
    with pytest.raises(TypeError):
        tokenize(clip_tokenizer, "a single string")


def test_literal_special_token_in_text_is_the_special_token(clip_tokenizer):
    """Like OpenAI's CLIP and the Hugging Face tokenizer (open_clip renamed its specials, so it differs here)."""
    ids, eos_index = tokenize(clip_tokenizer, ["a cat <|endoftext|> and a dog"])
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407]
    assert eos_index.tolist() == [3]


def test_offline_tokenizer_is_cached():
    assert load_clip_tokenizer() is load_clip_tokenizer()


def test_empty_folder_raises_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_clip_tokenizer(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message
    assert "vocab.json" in message and "merges.txt" in message and "tokenizer.json" in message


def test_missing_bpe_file_names_where_it_looked(monkeypatch):
    monkeypatch.setattr(tok_module, "BPE_FILE_NAME", "no_such_bpe_file.txt.gz")
    with pytest.raises(FileNotFoundError, match="no_such_bpe_file.txt.gz.*looked in"):
        tok_module._bpe_file()


def test_save_pretrained_round_trip(clip_tokenizer, tmp_path):
    clip_tokenizer.save_pretrained(tmp_path)
    loaded = load_clip_tokenizer(tmp_path)
    assert len(loaded) == VOCAB_SIZE
    ids, eos_index = tokenize(clip_tokenizer, CAPTIONS)
    loaded_ids, loaded_eos = tokenize(loaded, CAPTIONS)
    assert torch.equal(ids, loaded_ids)
    assert torch.equal(eos_index, loaded_eos)


def test_vocab_and_merges_folder(clip_tokenizer, tmp_path):
    """A folder laid out like openai/clip-vit-large-patch14 (vocab.json + merges.txt, no tokenizer.json)."""
    vocab, merges = build_clip_vocab(tok_module._bpe_file())
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                         encoding="utf-8")
    loaded = load_clip_tokenizer(tmp_path)
    assert len(loaded) == VOCAB_SIZE
    assert torch.equal(tokenize(loaded, CAPTIONS)[0], tokenize(clip_tokenizer, CAPTIONS)[0])
