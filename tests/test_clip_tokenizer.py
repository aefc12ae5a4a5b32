"""CLIPTokenizer: parity with transformers and open_clip on the real vocabulary.

transformers 5 has no slow (pure-Python) CLIPTokenizer any more:
`CLIPTokenizer` and `CLIPTokenizerFast` are the same `tokenizers`-backed
class, which is what diffusers' SD3 pipelines run; both names are checked.

open_clip's `SimpleTokenizer` differs from transformers (and so from us) in
exactly these ways, each pinned down by `test_matches_open_clip`:

1. Clean-up: open_clip runs `ftfy.fix_text` and `html.unescape` twice
   (`basic_clean`) before tokenizing; transformers does neither. So "&amp;",
   curly quotes, ligatures, full-width letters, mojibake, "½" next to
   Latin-1 letters and control characters tokenize differently. Fed
   open_clip's cleaned text, we match open_clip on every corpus prompt except
   those below.
2. Lowercase: Python's `str.lower` writes a word-final "Σ" as "ς";
   `tokenizers` lowercases character by character ("σ").
3. Special-token text: transformers maps "<|startoftext|>"/"<|endoftext|>"
   in a prompt to ids 49406/49407; open_clip names its specials
   "<start_of_text>"/"<end_of_text>" and maps those instead.
4. Padding: open_clip pads with id 0. With `pad_token="!"` (SD3's CLIP-G,
   id 0) transformers makes "!" a special token, so every "!" in a prompt is
   its own id 0, where open_clip BPE-merges runs such as "!!!".
"""

import functools
import html
import importlib.util
import json
import os
import subprocess
import sys
import unicodedata

import keras
import numpy as np
import pytest
from prompt_corpus import open_clip_bpe_path, prompt_corpus, write_clip_vocabulary

from keras_diffusion.models.stable_diffusion_3 import clip_tokenizer as module
from keras_diffusion.models.stable_diffusion_3.clip_tokenizer import CLIPTokenizer
from keras_diffusion.models.stable_diffusion_3.clip_tokenizer_files import (
    load_clip_tokenizer_files,
    read_pad_token,
)

transformers = pytest.importorskip("transformers")

START, END = 49406, 49407
OPEN_CLIP_DIFFERENCES = {  # prompt -> reason (see the module docstring)
    "ΟΔΟΣ ΣΟΦΙΑΣ": "final sigma",
    "<|startoftext|>": "special-token text",
    "a <|endoftext|> b": "special-token text",
    "<start_of_text> <end_of_text>": "open_clip's own special-token text",
}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    if open_clip_bpe_path() is None:
        pytest.skip("open_clip's bpe_simple_vocab_16e6.txt.gz is not installed")
    return write_clip_vocabulary(str(tmp_path_factory.mktemp("clip_vocab")))


@pytest.fixture(scope="module")
def corpus():
    return prompt_corpus()


@functools.cache
def make(clip_dir, pad_token="<|endoftext|>", sequence_length=77, fast_path=True):
    """A shared tokenizer on the real vocabulary (tests must not mutate it)."""
    tokenizer = CLIPTokenizer(
        os.path.join(clip_dir, "vocab.json"),
        os.path.join(clip_dir, "merges.txt"),
        pad_token=pad_token,
        sequence_length=sequence_length,
    )
    tokenizer._use_fast_path = fast_path  # False: everything via `tokenizers`
    return tokenizer


@functools.cache
def load_hf(clip_dir, name="CLIPTokenizer", pad_token="<|endoftext|>"):
    return getattr(transformers, name).from_pretrained(clip_dir, pad_token=pad_token)


def hf_ids(tokenizer, prompts, length=77):
    out = tokenizer(prompts, padding="max_length", max_length=length, truncation=True)
    return np.array(out.input_ids, dtype=np.int32)


def test_real_vocabulary_shape(clip_dir):
    tokenizer = make(clip_dir)
    assert tokenizer.vocabulary_size == 49408
    assert (tokenizer.start_token_id, tokenizer.end_token_id) == (START, END)
    assert tokenizer(["a photo of a cat"])[0, :7].tolist() == [
        START, 320, 1125, 539, 320, 2368, END,
    ]  # fmt: skip


# transformers 5 has one CLIP tokenizer class (CLIPTokenizerFast is an alias);
# on older versions the fast one is compared too.
HF_CLASSES = sorted(
    {"CLIPTokenizer"}
    | (
        set()
        if transformers.CLIPTokenizerFast is transformers.CLIPTokenizer
        else {"CLIPTokenizerFast"}
    )
)


@pytest.mark.parametrize("hf_name", HF_CLASSES)
@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
@pytest.mark.parametrize("fast_path", [True, False])
def test_matches_transformers(clip_dir, corpus, hf_name, pad_token, fast_path):
    hf = load_hf(clip_dir, hf_name, pad_token)
    ours = make(clip_dir, pad_token=pad_token, fast_path=fast_path)
    expected = hf_ids(hf, corpus)
    got = ours(corpus)
    assert got.dtype == np.int32 and got.shape == (len(corpus), 77)
    bad = [p for p, a, b in zip(corpus, got, expected) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]!r}"


@pytest.mark.parametrize("length", [2, 3, 10])
def test_short_sequence_length_matches_transformers(clip_dir, corpus, length):
    hf = load_hf(clip_dir, pad_token="!")
    ours = make(clip_dir, pad_token="!", sequence_length=length)
    np.testing.assert_array_equal(ours(corpus), hf_ids(hf, corpus, length))


def test_fast_characters_match_tokenizers_route(clip_dir):
    """Every fast-path character, in several contexts, takes the same ids as
    through the `tokenizers` pipeline (classes, case, whitespace, bytes)."""
    not_fast, _ = module._fast_tables()
    fast = [
        chr(c)
        for lo, hi in module._FAST_RANGES
        for c in range(lo, hi + 1)
        if not not_fast.search(chr(c))
    ]
    assert len(fast) > 4000
    # NFC cannot join two fast characters: none is the second half of a
    # canonical decomposition (those are combining marks, jamo, vowel signs).
    seconds = set()
    for code in range(0x110000):
        parts = unicodedata.decomposition(chr(code)).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            seconds.add(chr(int(parts[1], 16)))
    assert not seconds & set(fast)
    probes = [f"a{c}a {c}{c}b 1{c}2 {c}'s '{c}T" for c in fast]
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(fast), size=(2000, 12))
    probes += ["".join(fast[i] for i in row) for row in picks]
    assert not any(not_fast.search(p) for p in probes)
    fast_route, rust_route = make(clip_dir), make(clip_dir, fast_path=False)
    got, expected = fast_route(probes), rust_route(probes)
    bad = [p for p, a, b in zip(probes, got, expected) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} probes differ, e.g. {bad[:3]!r}"


@pytest.fixture(scope="module")
def open_clip_module():
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    pytest.importorskip("torch")
    # `import open_clip` needs torchvision; load only its tokenizer module.
    path = os.path.join(os.path.dirname(open_clip_bpe_path()), "tokenizer.py")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def zero_after_end(ids):
    """Our CLIP-L ids with open_clip's padding: zeros after the first end."""
    ids = ids.copy()
    first_end = np.argmax(ids == END, axis=1)
    ids[np.arange(ids.shape[1])[None, :] > first_end[:, None]] = 0
    return ids


def test_matches_open_clip(clip_dir, corpus, open_clip_module):
    simple = open_clip_module._tokenizer  # built from the same merge file
    ours = make(clip_dir)
    expected = simple(corpus).numpy()
    cleaned = [open_clip_module.basic_clean(p) for p in corpus]
    same_text = [c == p.strip() for p, c in zip(corpus, cleaned)]
    on_raw = zero_after_end(ours(corpus))
    on_cleaned = zero_after_end(ours(cleaned))
    for i, prompt in enumerate(corpus):
        if prompt in OPEN_CLIP_DIFFERENCES:  # listed differences still hold
            assert not np.array_equal(on_cleaned[i], expected[i]), prompt
            continue
        np.testing.assert_array_equal(on_cleaned[i], expected[i], err_msg=prompt)
        if same_text[i]:  # ftfy and html changed nothing: raw text agrees
            np.testing.assert_array_equal(on_raw[i], expected[i], err_msg=prompt)
    assert sum(same_text) > 450  # most of the corpus is compared on raw text
    # CLIP-G padding ("!" = id 0) equals open_clip's zeros when no "!" occurs.
    ours_g = make(clip_dir, pad_token="!")
    rows = [
        i
        for i, p in enumerate(corpus)
        if "!" not in p and same_text[i] and p not in OPEN_CLIP_DIFFERENCES
    ]
    np.testing.assert_array_equal(ours_g([corpus[i] for i in rows]), expected[rows])


def test_open_clip_differences_examples(clip_dir, open_clip_module):
    simple = open_clip_module._tokenizer  # built from the same merge file
    ours_l, ours_g = make(clip_dir), make(clip_dir, pad_token="!")
    # 1. HTML entities: open_clip unescapes "&amp;" to "&", we keep it.
    theirs = simple(["fish &amp; chips"]).numpy()
    np.testing.assert_array_equal(zero_after_end(ours_l(["fish & chips"])), theirs)
    assert not np.array_equal(zero_after_end(ours_l(["fish &amp; chips"])), theirs)
    assert html.unescape("&amp;") == "&"
    # 4. "!" is its own special token (id 0) under CLIP-G padding.
    assert ours_g(["wow!!!"])[0, :6].tolist() == [START, 2781, 0, 0, 0, END]
    assert simple(["wow!!!"])[0, :4].tolist() == [START, 2781, 995, END]
    assert ours_l(["wow!!!"])[0, :4].tolist() == [START, 2781, 995, END]


def test_truncation_keeps_end_token(clip_dir):
    for pad in ("<|endoftext|>", "!"):
        ids = make(clip_dir, pad_token=pad)(["word " * 200, "cat"])
        assert ids[0, -1] == END and ids[0, 0] == START
        assert (ids[0, 1:-1] == ids[0, 1]).all()
        assert ids[1, 3:].tolist() == [END if pad != "!" else 0] * 74


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (None, "NoneType"),
        (3, "int"),
        (["ok", None], "`inputs[1]`"),
        (["ok", ["nested"]], "`inputs[1]`"),
        ([b"ok", 1.5], "`inputs[1]`"),
        (np.array([["a"], ["b"]]), "shape (2, 1)"),
    ],
)
def test_bad_prompts_raise_type_error(clip_dir, bad, fragment):
    tokenizer = make(clip_dir)
    with pytest.raises(TypeError, match="inputs") as info:
        tokenizer(bad)
    assert fragment in str(info.value)
    with pytest.raises(TypeError, match="prompts"):
        tokenizer.tokenize(bad)


def test_accepts_str_bytes_tuple_array_and_empty(clip_dir):
    tokenizer = make(clip_dir)
    one = tokenizer("a cat")
    assert one.shape == (1, 77)
    np.testing.assert_array_equal(tokenizer([b"a cat"]), one)
    np.testing.assert_array_equal(tokenizer(("a cat",)), one)
    np.testing.assert_array_equal(tokenizer(np.array(["a cat"])), one)
    assert tokenizer([]).shape == (0, 77)


def test_missing_and_corrupt_files(clip_dir, tmp_path):
    vocab, merges = (os.path.join(clip_dir, n) for n in ("vocab.json", "merges.txt"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CLIPTokenizer(str(tmp_path / "nope.json"), merges)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        CLIPTokenizer(vocab, str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer().load_assets(str(tmp_path))
    cases = {
        "truncated.json": ('{"a": 0, "b', "truncated.json"),
        "list.json": ("[1, 2]", "list"),
        "badid.json": ('{"a": "zero"}', "'a'"),
    }
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=fragment):
            CLIPTokenizer(str(tmp_path / name), merges)
    (tmp_path / "three.txt").write_text("#version: 0.2\ni n\na b c\n")
    with pytest.raises(ValueError, match="three.txt.*entry 1"):
        CLIPTokenizer(vocab, str(tmp_path / "three.txt"))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="binary.txt"):
        CLIPTokenizer(vocab, str(tmp_path / "binary.txt"))
    (tmp_path / "unknown.txt").write_text("#version: 0.2\nzzzq qqqz\n")
    with pytest.raises(ValueError, match="Inconsistent"):
        CLIPTokenizer(vocab, str(tmp_path / "unknown.txt"))
    with pytest.raises(ValueError, match="<\\|startoftext\\|>"):
        CLIPTokenizer({"a": 0, "<|endoftext|>": 1}, [])
    with pytest.raises(ValueError, match="'<pad>'"):
        make(clip_dir, pad_token="<pad>")
    with pytest.raises(ValueError, match="both"):
        CLIPTokenizer(vocab)
    with pytest.raises(TypeError, match="sequence_length"):
        CLIPTokenizer(sequence_length=7.0)
    with pytest.raises(ValueError, match="no vocabulary"):
        CLIPTokenizer()(["a"])


def test_config_and_assets_round_trip(clip_dir, corpus, tmp_path):
    original = make(clip_dir, pad_token="!", sequence_length=40)
    config = original.get_config()
    assert config == {"sequence_length": 40, "pad_token": "!"}
    assert json.loads(json.dumps(config)) == config
    assert keras.saving.get_registered_name(CLIPTokenizer) == (
        "keras_diffusion>CLIPTokenizer"
    )
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(original)
    )
    assert type(restored) is CLIPTokenizer and restored.get_config() == config
    assert restored.missing_assets(str(tmp_path)) == ["vocab.json", "merges.txt"]
    original.save_assets(str(tmp_path))
    assert restored.missing_assets(str(tmp_path)) == []
    restored.load_assets(str(tmp_path))
    np.testing.assert_array_equal(restored(corpus), original(corpus))
    with pytest.raises(ValueError, match="no vocabulary"):
        CLIPTokenizer().save_assets(str(tmp_path / "x"))


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_load_from_tokenizer_json_folder(clip_dir, corpus, tmp_path, pad_token):
    hf = load_hf(clip_dir, "CLIPTokenizerFast", pad_token)
    hf.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()  # transformers 5: JSON only
    vocabulary, merges = load_clip_tokenizer_files(str(tmp_path))
    assert read_pad_token(str(tmp_path)) == pad_token
    ours = CLIPTokenizer(vocabulary, merges, pad_token=read_pad_token(str(tmp_path)))
    np.testing.assert_array_equal(ours(corpus), hf_ids(hf, corpus))
    # The vocab.json + merges.txt folder gives the same tables.
    assert load_clip_tokenizer_files(clip_dir) == (vocabulary, merges)


def test_tf_tokenize_in_dataset_map(clip_dir, corpus):
    tf = pytest.importorskip("tensorflow")
    tokenizer = make(clip_dir, pad_token="!")
    prompts = corpus[:40] + corpus[-40:]
    dataset = tf.data.Dataset.from_tensor_slices(prompts).batch(16)
    batches = [b.numpy() for b in dataset.map(tokenizer.tf_tokenize)]
    assert batches[0].shape == (16, 77)
    np.testing.assert_array_equal(np.concatenate(batches), tokenizer(prompts))


def test_works_without_tensorflow(clip_dir):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("blocked")
sys.meta_path.insert(0, Block())
from keras_diffusion.models.stable_diffusion_3.clip_tokenizer import CLIPTokenizer
t = CLIPTokenizer({os.path.join(clip_dir, "vocab.json")!r},
                  {os.path.join(clip_dir, "merges.txt")!r})
print(t(["a photo of a cat", "日本"])[:, :4].tolist())
assert "tensorflow" not in sys.modules
"""
    env = dict(os.environ, KERAS_BACKEND="numpy")
    src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[[49406, 320, 1125, 539]" in result.stdout


def test_docstring_examples():
    import doctest

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
