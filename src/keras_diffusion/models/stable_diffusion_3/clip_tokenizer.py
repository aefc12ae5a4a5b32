"""OpenAI CLIP's byte-level BPE tokenizer, as Stable Diffusion 3 uses it.

Ids equal `transformers.CLIPTokenizer`'s (diffusers' SD3 pipelines call it
with `padding="max_length", max_length=77, truncation=True`) and open_clip's
wherever ftfy and HTML unescaping leave the text alone (the tests list the
exact differences). Steps: special tokens (`<|startoftext|>`,
`<|endoftext|>` and, as in transformers, the pad token: with
`pad_token="!"`, SD3's CLIP-G, every "!" is its own id 0) are cut out of the
raw text; NFC, whitespace runs to one space, lowercase (no ftfy, no HTML
unescaping: transformers does neither); CLIP's regex splits contractions,
letter runs, single digits and other non-space runs; each piece becomes
byte-level symbols, the last ending in `</w>`, merged by BPE rank; then
start + ids + end, truncated to `sequence_length` with the end token last,
padded with `pad_token`.

Speed, measured (10,000 prompts of `tests/prompt_corpus.py`, real vocabulary,
2 busy shared cores): the `tokenizers` Rust pipeline alone ~0.15M tokens/s,
a pure-Python BPE with a per-piece cache ~0.55M tokens/s (Rust pays for
offsets, alignments and per-token objects). Python is exact only where its
Unicode tables agree with the Rust ones, so both are used: prompts made only
of `_FAST_RANGES` characters (ASCII, Latin, punctuation, symbols, emoji;
each checked against the Rust pipeline in the tests) take the Python path,
the rest go through `tokenizers` in one batch. Hybrid: ~0.35M tokens/s, 3-4x
transformers (`benchmarks/tokenizer_speed.py`).
"""

import functools
import json
import os
import re
import unicodedata

import numpy as np

from keras_diffusion.api_export import register
from keras_diffusion.models.stable_diffusion_3.clip_tokenizer_files import (
    END_TOKEN,
    START_TOKEN,
    check_merges,
    check_vocabulary,
    read_json,
    read_merges,
)
from keras_diffusion.models.tokenizer import Tokenizer, validate_prompts

CLIP_SPLIT_PATTERN = (  # CLIP's pre-tokenization regex.
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_FAST_RANGES = (
    (0x0000, 0x024F),  # ASCII, Latin-1, Latin Extended-A/B
    (0x200D, 0x200D),  # zero-width joiner (emoji sequences)
    (0x2010, 0x2027),  # dashes, quotes, bullets, ellipsis
    (0x2030, 0x205E),  # per mille, primes, more punctuation
    (0x2190, 0x23FF),  # arrows, math operators, technical symbols
    (0x25A0, 0x27BF),  # shapes, misc symbols, dingbats
    (0xFE0F, 0xFE0F),  # emoji presentation selector
    (0x1F000, 0x1FAFF),  # emoji and pictographs
)
# Unicode White_Space (what `\s` matches in the Rust pipeline) inside the
# fast ranges; Python's str.isspace() would also take \x1c-\x1f.
_FAST_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0"
_CACHE_LIMIT = 200_000


@functools.cache
def _fast_tables():
    """(regex finding a non-fast char, CLIP's split regex for fast text)."""
    chars = (chr(c) for lo, hi in _FAST_RANGES for c in range(lo, hi + 1))
    # Characters NFC leaves alone, whose lowercase is made of such characters.
    ok = {c for c in chars if unicodedata.normalize("NFC", c) == c}
    ok -= {c for c in ok if unicodedata.combining(c)}
    fast = {c for c in ok if all(x in ok for x in c.lower())}

    def char_class(members):  # "\\U...-\\U..." ranges for a regex class
        points, parts = sorted(map(ord, members)), []
        for i, c in enumerate(points):
            if i and c == points[i - 1] + 1:
                parts[-1][1] = c
            else:
                parts.append([c, c])
        return "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in parts)

    fast_class = char_class(fast)
    letters = char_class(c for c in fast if unicodedata.category(c)[0] == "L")
    digits = char_class(c for c in fast if unicodedata.category(c)[0] == "N")
    space = char_class(_FAST_WHITESPACE)
    word = re.compile(
        f"'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{digits}]|[^{space}{letters}{digits}]+"
    )
    return re.compile(f"[^{fast_class}]"), word


# OpenAI's reversible byte -> printable character table.
_KEPT = [*range(33, 127), *range(161, 173), *range(174, 256)]
_MOVED = {b: chr(256 + i) for i, b in enumerate(sorted(set(range(256)) - {*_KEPT}))}
_BYTE_SYMBOLS = [chr(b) if b in _KEPT else _MOVED[b] for b in range(256)]


@register
class CLIPTokenizer(Tokenizer):
    """CLIP byte-level BPE tokenizer with fixed-length int32 output.

    Args:
        vocabulary: path to `vocab.json`, or a dict token -> id.
        merges: path to `merges.txt`, or a list of "a b" merge strings.
        sequence_length: output length, 77 for SD3.
        pad_token: "<|endoftext|>" (SD3 CLIP-L) or "!" (SD3 CLIP-G).

    Built without `vocabulary`/`merges` (e.g. by `from_config`), it needs
    `load_assets(dir)` before use.

    Examples:

    >>> vocab = {"a": 0, "b": 1, "a</w>": 2, "b</w>": 3, "ab</w>": 4,
    ...          "<|startoftext|>": 5, "<|endoftext|>": 6}
    >>> tokenizer = CLIPTokenizer(vocab, ["a b</w>"], sequence_length=6)
    >>> tokenizer(["ab a", "B"])
    array([[5, 4, 2, 6, 6, 6],
           [5, 3, 6, 6, 6, 6]], dtype=int32)
    >>> CLIPTokenizer(vocab, ["a b</w>"], sequence_length=4)("a a a a")
    array([[5, 2, 2, 6]], dtype=int32)
    """

    asset_files = ("vocab.json", "merges.txt")

    def __init__(
        self, vocabulary=None, merges=None, sequence_length=77, pad_token=END_TOKEN
    ):
        if type(sequence_length) is not int:
            raise TypeError(
                "`sequence_length` must be an int; got "
                f"{type(sequence_length).__name__}."
            )
        if sequence_length < 2:
            raise ValueError(f"`sequence_length` must be >= 2; got {sequence_length}.")
        if not isinstance(pad_token, str) or not pad_token:
            raise TypeError(f"`pad_token` must be a non-empty str; got {pad_token!r}.")
        self.sequence_length = sequence_length
        self.pad_token = pad_token
        self.vocabulary = self.merges = self._backend = None
        self._use_fast_path = True
        if vocabulary is not None or merges is not None:
            self.set_vocabulary_and_merges(vocabulary, merges)

    def set_vocabulary_and_merges(self, vocabulary, merges):
        """Set the BPE tables from file paths or in-memory objects."""
        if vocabulary is None or merges is None:
            raise ValueError("Pass both `vocabulary` and `merges`, or neither.")
        if isinstance(vocabulary, (str, os.PathLike)):
            path = os.fspath(vocabulary)
            vocabulary = check_vocabulary(read_json(path, "vocabulary"), path)
        else:
            vocabulary = check_vocabulary(vocabulary, "vocabulary")
        if isinstance(merges, (str, os.PathLike)):
            pairs = read_merges(os.fspath(merges))
        else:
            pairs = check_merges(merges, "merges")
        specials = list(dict.fromkeys([START_TOKEN, END_TOKEN, self.pad_token]))
        for token in specials:
            if token not in vocabulary:
                raise ValueError(f"The CLIP vocabulary has no {token!r} token.")
        self._backend = self._build_backend(vocabulary, pairs, specials)
        self.vocabulary = vocabulary
        self.merges = [f"{a} {b}" for a, b in pairs]
        self.start_token_id = vocabulary[START_TOKEN]
        self.end_token_id = vocabulary[END_TOKEN]
        self.pad_token_id = vocabulary[self.pad_token]
        self._ranks = {pair: rank for rank, pair in enumerate(pairs)}
        self._special_ids = {t: vocabulary[t] for t in specials}
        by_length = sorted(specials, key=len, reverse=True)
        self._special_split = re.compile(f"({'|'.join(map(re.escape, by_length))})")
        self._cache = {}
        self._not_fast, self._fast_word = _fast_tables()

    def _build_backend(self, vocabulary, pairs, specials):
        """The `tokenizers` pipeline transformers uses, minus padding (any text)."""
        from tokenizers import AddedToken, Regex, Tokenizer, models
        from tokenizers import normalizers as norm
        from tokenizers import pre_tokenizers as pre

        try:
            model = models.BPE(
                vocabulary, pairs, end_of_word_suffix="</w>", unk_token=END_TOKEN
            )
        except Exception as e:
            raise ValueError(f"Inconsistent CLIP vocabulary and merges: {e}") from None
        backend = Tokenizer(model)
        backend.normalizer = norm.Sequence(
            [norm.NFC(), norm.Replace(Regex(r"\s+"), " "), norm.Lowercase()]
        )
        split = pre.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True)
        backend.pre_tokenizer = pre.Sequence(
            [split, pre.ByteLevel(add_prefix_space=False)]
        )
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in specials]
        )
        return backend

    @property
    def vocabulary_size(self):
        return None if self.vocabulary is None else len(self.vocabulary)

    def _bpe(self, word):
        """Ids of one pre-tokenized piece (cached per piece)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        symbols = [_BYTE_SYMBOLS[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        ranks = self._ranks
        while len(symbols) > 1:
            pair_ranks = [ranks.get(p) for p in zip(symbols, symbols[1:])]
            best = min((r for r in pair_ranks if r is not None), default=None)
            if best is None:
                break
            at = pair_ranks.index(best)
            first, second = symbols[at], symbols[at + 1]
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if symbols[i] == first and symbols[i + 1 : i + 2] == [second]:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unknown = self.end_token_id  # transformers' unk token
        ids = [self.vocabulary.get(s, unknown) for s in symbols]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _encode_fast(self, text):
        """Ids without start/end tokens, for text made of fast characters."""
        ids = []
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                ids.append(self._special_ids[part])
            elif part:
                for word in self._fast_word.findall(part.lower()):
                    ids.extend(self._bpe(word))
        return ids

    def tokenize(self, prompts):
        """Ids of shape `(len(prompts), sequence_length)`, int32."""
        prompts = validate_prompts(prompts, "prompts")
        if self._backend is None:
            raise ValueError(
                "This CLIPTokenizer has no vocabulary: pass `vocabulary` and "
                "`merges`, or call `load_assets(dir)`."
            )
        pieces, slow = [], []
        fast, not_fast = self._use_fast_path, self._not_fast
        for row, text in enumerate(prompts):
            if fast and (text.isascii() or not not_fast.search(text)):
                pieces.append(self._encode_fast(text))
            else:
                pieces.append(None)
                slow.append(row)
        if slow:
            encodings = self._backend.encode_batch_fast(
                [prompts[row] for row in slow], add_special_tokens=False
            )
            for row, encoding in zip(slow, encodings):
                pieces[row] = encoding.ids
        length = self.sequence_length
        out = np.full((len(prompts), length), self.pad_token_id, np.int32)
        out[:, 0] = self.start_token_id
        for row, ids in enumerate(pieces):
            ids = ids[: length - 2]  # truncate, keeping room for the end token
            out[row, 1 : len(ids) + 1] = ids
            out[row, len(ids) + 1] = self.end_token_id
        return out

    def get_config(self):
        return {"sequence_length": self.sequence_length, "pad_token": self.pad_token}

    def save_assets(self, dir_path):
        if self.vocabulary is None:
            raise ValueError("This CLIPTokenizer has no vocabulary to save.")
        os.makedirs(dir_path, exist_ok=True)
        with open(os.path.join(dir_path, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocabulary, f, ensure_ascii=False)
        with open(os.path.join(dir_path, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(self.merges) + "\n")

    def load_assets(self, dir_path):
        self.set_vocabulary_and_merges(
            os.path.join(dir_path, "vocab.json"), os.path.join(dir_path, "merges.txt")
        )
