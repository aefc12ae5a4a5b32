"""Reading CLIP BPE tokenizer files, and checking their tables.

Hugging Face folders carry `vocab.json` + `merges.txt`, transformers 5
saves only `tokenizer.json`; `load_clip_tokenizer_files` reads either.
`CLIPTokenizer` (`clip_tokenizer.py`) checks in-memory tables and reads its
preset assets through the same functions, so every source gets the same
errors, each naming the file or argument at fault.
"""

import os

from keras_diffusion.utils.python_utils import read_json as load_json

# CLIP's special tokens; SD3's CLIP-L pads with the end token (CLIP-G
# names "!" in its files).
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def read_json(path, what):
    """The JSON in `path`; errors name the file and what it should hold."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP {what} file not found: {path}")
    return load_json(path, f"CLIP {what} file {path} is not valid JSON")


def check_vocabulary(vocabulary, source):
    """A copy of `vocabulary` (token -> id) once every entry is checked."""
    if not isinstance(vocabulary, dict) or not vocabulary:
        raise ValueError(
            f"CLIP vocabulary ({source}) must be a non-empty mapping of token to "
            f"id; got {type(vocabulary).__name__}."
        )
    for token, index in vocabulary.items():
        if not (isinstance(token, str) and type(index) is int and index >= 0):
            raise ValueError(
                f"CLIP vocabulary ({source}): entry {token!r}: {index!r} is not "
                "a string mapped to a non-negative int."
            )
    return dict(vocabulary)


def read_merges(path):
    """The `(a, b)` merge pairs of a `merges.txt` (its `#version` line skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP merges file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"CLIP merges file {path} is not UTF-8 text: {e}") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return check_merges([line for line in lines if line], path)


def check_merges(merges, source):
    """`merges` ("a b" strings or pairs) as checked `(a, b)` tuples, in rank order."""
    if not isinstance(merges, (list, tuple)):
        raise ValueError(
            f"CLIP merges ({source}) must be a list of 'a b' strings; got "
            f"{type(merges).__name__}."
        )
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise ValueError(
                f"CLIP merges ({source}): entry {i} must be two symbols "
                f"separated by one space; got {merges[i]!r}."
            )
    return pairs


def load_clip_tokenizer_files(folder):
    """Read `(vocabulary dict, merges list)` from a Hugging Face folder.

    Uses `vocab.json` + `merges.txt` when both exist, else the BPE model in
    `tokenizer.json` (transformers 5 saves only that file).

    Examples:

    >>> import tempfile
    >>> from tokenizers import Tokenizer, models
    >>> vocab = {"a": 0, "b</w>": 1, "ab</w>": 2}
    >>> folder = tempfile.mkdtemp()
    >>> Tokenizer(models.BPE(vocab, [("a", "b</w>")])).save(
    ...     f"{folder}/tokenizer.json")
    >>> load_clip_tokenizer_files(folder)
    ({'a': 0, 'b</w>': 1, 'ab</w>': 2}, ['a b</w>'])
    """
    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    json_path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        vocabulary = check_vocabulary(read_json(vocab_path, "vocabulary"), vocab_path)
        pairs = read_merges(merges_path)
    elif os.path.isfile(json_path):
        spec = read_json(json_path, "tokenizer")
        try:
            model = spec["model"]
            if model.get("type", "BPE") != "BPE":
                raise ValueError(f"model type is {model['type']!r}, not 'BPE'")
            vocabulary = check_vocabulary(model["vocab"], json_path)
            pairs = check_merges(model["merges"], json_path)
            for added in spec.get("added_tokens") or []:
                vocabulary.setdefault(added["content"], added["id"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{json_path} is not a CLIP BPE tokenizer: {e}") from None
    else:
        raise FileNotFoundError(
            f"No CLIP tokenizer files in {folder}: expected vocab.json and "
            "merges.txt, or tokenizer.json."
        )
    return vocabulary, [f"{a} {b}" for a, b in pairs]


def read_pad_token(folder, default=END_TOKEN):
    """The pad token a Hugging Face tokenizer folder names, else `default`.

    Looks in `tokenizer_config.json`, `special_tokens_map.json`, then the
    padding section of `tokenizer.json`. SD3's `tokenizer_2` pads with "!".

    Examples:

    >>> import tempfile
    >>> read_pad_token(tempfile.mkdtemp())
    '<|endoftext|>'
    """
    for name, keys in (
        ("tokenizer_config.json", ("pad_token",)),
        ("special_tokens_map.json", ("pad_token",)),
        ("tokenizer.json", ("padding", "pad_token")),
    ):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        value = read_json(path, "tokenizer settings")
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, dict):  # {"content": "!", "__type": "AddedToken"}
            value = value.get("content")
        if isinstance(value, str):
            return value
    return default
