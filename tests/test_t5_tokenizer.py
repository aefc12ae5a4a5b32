"""T5Tokenizer: parity with transformers' T5TokenizerFast (what diffusers uses).

The reference is a tiny SentencePiece unigram model trained here, offline,
on the prompt corpus (T5's id layout: <pad>=0, </s>=1, <unk>=2, no BOS),
loaded by transformers from `spiece.model` (converted with protobuf) and
from the `tokenizer.json` transformers saves.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from prompt_corpus import prompt_corpus

from keras_diffusion.models.stable_diffusion_3 import t5_tokenizer as module
from keras_diffusion.models.stable_diffusion_3.t5_tokenizer import (
    T5Tokenizer,
    parse_sentencepiece_model,
)

transformers = pytest.importorskip("transformers")

EXTRA_PROMPTS = [
    "a </s> b",
    "a</s>b<pad>c<unk>",
    "x <extra_id_0> y<extra_id_99>z <extra_id_100>",
    "ＡＢＣ full width ｆｕｌｌ",
    "ﬁsh ligature ①②",
]


@pytest.fixture(scope="module")
def corpus():
    return prompt_corpus() + EXTRA_PROMPTS


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    folder = str(tmp_path_factory.mktemp("t5_spm"))
    sentences = [p for p in prompt_corpus() if p.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=os.path.join(folder, "spiece"),
        vocab_size=400,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(spm_dir):
    pytest.importorskip("google.protobuf")  # transformers' spiece converter
    return transformers.T5TokenizerFast.from_pretrained(spm_dir)


@pytest.fixture(scope="module")
def json_dir(hf_tokenizer, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("t5_json"))
    hf_tokenizer.save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
    return folder


def hf_ids(tokenizer, prompts, length):
    out = tokenizer(
        prompts,
        padding="max_length",
        max_length=length,
        truncation=True,
        add_special_tokens=True,
    )
    return np.array(out.input_ids, dtype=np.int32)


@pytest.mark.parametrize("source", ["spiece.model", "tokenizer.json"])
@pytest.mark.parametrize("length", [256, 77, 8, 1])
def test_matches_transformers(spm_dir, json_dir, hf_tokenizer, corpus, source, length):
    folder = spm_dir if source == "spiece.model" else json_dir
    ours = T5Tokenizer(os.path.join(folder, source), sequence_length=length)
    expected = hf_ids(hf_tokenizer, corpus, length)
    got = ours(corpus)
    assert got.dtype == np.int32 and got.shape == (len(corpus), length)
    bad = [p for p, a, b in zip(corpus, got, expected) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]!r}"


def test_layout_eos_pad_unk_and_specials(spm_dir):
    tokenizer = T5Tokenizer(os.path.join(spm_dir, "spiece.model"), sequence_length=12)
    assert (tokenizer.pad_token_id, tokenizer.end_token_id) == (0, 1)
    assert tokenizer.vocabulary_size == 400 + 100  # pieces + <extra_id_N>
    ids = tokenizer(["", "a cat", "word " * 100, "猫 \U0001f99c", "<extra_id_0>"])
    assert ids[0].tolist() == [1] + [0] * 11
    assert ids[1, ids[1].tolist().index(1) + 1 :].tolist() == [0] * (
        11 - ids[1].tolist().index(1)
    )
    assert ids[2, -1] == 1 and 0 not in ids[2].tolist() and 1 not in ids[2, :-1]
    assert 2 in ids[3].tolist()  # rare characters are <unk>
    assert ids[4, :2].tolist() == [499, 1]  # sentinels count down from the end


def test_parse_sentencepiece_model(spm_dir):
    sentencepiece = pytest.importorskip("sentencepiece")
    path = os.path.join(spm_dir, "spiece.model")
    with open(path, "rb") as f:
        pieces, charsmap = parse_sentencepiece_model(f.read())
    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    assert len(pieces) == processor.get_piece_size()
    for i, (piece, score, kind) in enumerate(pieces):
        assert piece == processor.id_to_piece(i)
        assert score == pytest.approx(processor.get_score(i), abs=0, rel=1e-7)
        assert (kind == 2) == processor.is_unknown(i)
        assert (kind == 3) == processor.is_control(i)
    assert len(charsmap) > 1000  # nmt_nfkc's precompiled map


@pytest.mark.parametrize("source", ["spiece.model", "tokenizer.json"])
def test_config_and_assets_round_trip(spm_dir, json_dir, corpus, tmp_path, source):
    folder = spm_dir if source == "spiece.model" else json_dir
    original = T5Tokenizer(os.path.join(folder, source), sequence_length=64)
    config = original.get_config()
    assert config == {"sequence_length": 64}
    assert json.loads(json.dumps(config)) == config
    assert keras.saving.get_registered_object("keras_diffusion>T5Tokenizer") is (
        T5Tokenizer
    )
    restored = T5Tokenizer.from_config(config)
    assert restored.missing_assets(str(tmp_path)) == ["spiece.model", "tokenizer.json"]
    original.save_assets(str(tmp_path))
    assert os.listdir(tmp_path) == [source]  # saved under the name it came from
    assert original.asset_files == (source,)
    assert restored.missing_assets(str(tmp_path)) == []
    restored.load_assets(str(tmp_path))
    assert restored.asset_files == (source,)
    np.testing.assert_array_equal(restored(corpus), original(corpus))
    with open(os.path.join(folder, source), "rb") as a:
        with open(tmp_path / source, "rb") as b:
            assert a.read() == b.read()


def test_missing_and_corrupt_files(spm_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        T5Tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="spiece.model or tokenizer.json"):
        T5Tokenizer().load_assets(str(tmp_path))
    (tmp_path / "garbage.model").write_bytes(b"\xff\xff\xff\xff not a proto")
    with pytest.raises(ValueError, match="garbage.model.*SentencePiece"):
        T5Tokenizer(str(tmp_path / "garbage.model"))
    with open(os.path.join(spm_dir, "spiece.model"), "rb") as f:
        data = f.read()
    (tmp_path / "cut.model").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.model"):
        T5Tokenizer(str(tmp_path / "cut.model"))
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model"):
        T5Tokenizer(str(tmp_path / "empty.model"))
    (tmp_path / "bad.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="bad.json.*tokenizer.json"):
        T5Tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(TypeError, match="proto"):
        T5Tokenizer(proto=b"bytes")
    with pytest.raises(TypeError, match="sequence_length"):
        T5Tokenizer(sequence_length="256")
    with pytest.raises(ValueError, match="no vocabulary"):
        T5Tokenizer()(["a"])
    with pytest.raises(ValueError, match="no vocabulary"):
        T5Tokenizer().save_assets(str(tmp_path / "out"))


def test_json_without_pad_token_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0)], unk_id=0)).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(ValueError, match="<pad> or </s>"):
        T5Tokenizer(str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize(
    "bad, fragment",
    [(None, "NoneType"), (["ok", None], "`inputs[1]`"), ([["x"]], "`inputs[0]`")],
)
def test_bad_prompts_raise_type_error(spm_dir, bad, fragment):
    tokenizer = T5Tokenizer(os.path.join(spm_dir, "spiece.model"))
    with pytest.raises(TypeError, match="inputs") as info:
        tokenizer(bad)
    assert fragment in str(info.value)
    assert tokenizer([]).shape == (0, 256)


def test_tf_tokenize_in_dataset_map(spm_dir, corpus):
    tf = pytest.importorskip("tensorflow")
    tokenizer = T5Tokenizer(os.path.join(spm_dir, "spiece.model"), sequence_length=32)
    prompts = corpus[:30] + corpus[-30:]
    dataset = tf.data.Dataset.from_tensor_slices(prompts).batch(16)
    batches = [b.numpy() for b in dataset.map(tokenizer.tf_tokenize)]
    assert batches[0].shape == (16, 32)
    np.testing.assert_array_equal(np.concatenate(batches), tokenizer(prompts))


def test_works_without_tensorflow_and_sentencepiece(spm_dir):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "sentencepiece", "google"):
            raise ImportError("blocked")
sys.meta_path.insert(0, Block())
from keras_diffusion.models.stable_diffusion_3.t5_tokenizer import T5Tokenizer
t = T5Tokenizer({os.path.join(spm_dir, "spiece.model")!r}, sequence_length=4)
print(t(["", "a"]).tolist())
assert not {{"tensorflow", "sentencepiece"}} & set(sys.modules)
"""
    env = dict(os.environ, KERAS_BACKEND="numpy")
    src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("[[1, 0, 0, 0], [")


def test_docstring_examples():
    import doctest

    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0
