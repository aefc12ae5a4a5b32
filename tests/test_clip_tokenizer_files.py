"""clip_tokenizer_files: reading CLIP BPE tables from Hugging Face folders.

The real-vocabulary parity of a `tokenizer.json` folder against transformers
is in `test_clip_tokenizer.py` (`test_load_from_tokenizer_json_folder`).
"""

import doctest
import json

import pytest

from keras_diffusion.models.stable_diffusion_3 import clip_tokenizer_files as module
from keras_diffusion.models.stable_diffusion_3.clip_tokenizer_files import (
    check_merges,
    check_vocabulary,
    load_clip_tokenizer_files,
    read_pad_token,
)

VOCABULARY = {"a": 0, "b</w>": 1, "ab</w>": 2, "<|startoftext|>": 3}


def test_both_layouts_give_the_same_tables(tmp_path):
    files, single = tmp_path / "files", tmp_path / "single"
    files.mkdir()
    single.mkdir()
    (files / "vocab.json").write_text(json.dumps(VOCABULARY))
    # transformers' header line and a trailing blank line are not merges.
    (files / "merges.txt").write_text("#version: 0.2\na b</w>\n\n")
    spec = {
        "model": {
            "type": "BPE",
            "vocab": {k: v for k, v in VOCABULARY.items() if k[0] != "<"},
            "merges": [["a", "b</w>"]],
        },
        # transformers 5 keeps the special tokens out of the BPE model.
        "added_tokens": [{"content": "<|startoftext|>", "id": 3}],
    }
    (single / "tokenizer.json").write_text(json.dumps(spec))
    expected = (VOCABULARY, ["a b</w>"])
    assert load_clip_tokenizer_files(str(files)) == expected
    assert load_clip_tokenizer_files(str(single)) == expected
    # With both present, vocab.json + merges.txt win.
    (files / "tokenizer.json").write_text("not json")
    assert load_clip_tokenizer_files(str(files)) == expected


def test_folder_helpers_errors_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_clip_tokenizer_files(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_clip_tokenizer_files(str(tmp_path))
    assert read_pad_token(str(tmp_path)) == "<|endoftext|>"
    (tmp_path / "special_tokens_map.json").write_text(
        '{"pad_token": {"content": "!", "lstrip": false}}'
    )
    assert read_pad_token(str(tmp_path)) == "!"
    (tmp_path / "tokenizer_config.json").write_text('{"pad_token": "<|endoftext|>"}')
    assert read_pad_token(str(tmp_path)) == "<|endoftext|>"


@pytest.mark.parametrize(
    "vocabulary, fragment",
    [({}, "non-empty mapping"), ({"a": -1}, "'a': -1"), ({"a": True}, "'a': True")],
)
def test_check_vocabulary_names_the_bad_entry(vocabulary, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_vocabulary(vocabulary, "test")


def test_check_merges_accepts_strings_and_pairs():
    assert check_merges(["a b", ("c", "d")], "test") == [("a", "b"), ("c", "d")]
    with pytest.raises(ValueError, match="entry 1"):
        check_merges(["a b", "a b c"], "test")
    with pytest.raises(ValueError, match="list"):
        check_merges("a b", "test")


def test_docstring_examples():
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
