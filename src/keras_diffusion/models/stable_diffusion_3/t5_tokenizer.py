"""T5's SentencePiece (unigram) tokenizer, as Stable Diffusion 3 uses it.

Ids equal transformers' `T5TokenizerFast(prompts, padding="max_length",
max_length=sequence_length, truncation=True, add_special_tokens=True)`, what
diffusers' SD3 pipelines call: the text's ids, then EOS (`</s>`, id 1);
truncation keeps EOS in the last slot; padding uses `<pad>` (id 0).

Two asset formats are read, each saved back under its usual name:

* `spiece.model`: the SentencePiece model. We read its protobuf ourselves
  (pieces, scores, types and the precompiled normalization map) and build the
  same `tokenizers` pipeline transformers builds from it: precompiled
  normalizer, whitespace split, "▁" prefix on every word, unigram Viterbi,
  plus the 100 `<extra_id_N>` sentinels. Neither `sentencepiece` nor
  `protobuf` is needed.
* `tokenizer.json`: a saved `tokenizers` pipeline, used as it is.

Special-token text in a prompt (`</s>`, `<pad>`, `<unk>`, `<extra_id_N>`)
maps to its id, as in transformers.
"""

import os
import struct

import numpy as np

from keras_diffusion.api_export import register
from keras_diffusion.models.tokenizer import Tokenizer, validate_prompts

SPM_FILE = "spiece.model"
JSON_FILE = "tokenizer.json"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
EXTRA_IDS = 100
# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def _varint(buf, pos):
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _proto_fields(buf):
    """Yield `(field number, value)` of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield key >> 3, value


def parse_sentencepiece_model(data):
    """Read `(pieces, precompiled_charsmap)` from `spiece.model` bytes.

    `pieces` is a list of `(piece, score, type)`; types follow
    sentencepiece: 1 normal, 2 unknown, 3 control, 4 user-defined.

    Examples:

    >>> piece = b"\\n\\x05<unk>" + b"\\x15\\x00\\x00\\x00\\x00" + b"\\x18\\x02"
    >>> parse_sentencepiece_model(b"\\n" + bytes([len(piece)]) + piece)
    ([('<unk>', 0.0, 2)], b'')
    """
    pieces, charsmap, model_type = [], b"", 1
    for number, value in _proto_fields(data):
        if number == 1:  # ModelProto.pieces
            piece, score, kind = None, 0.0, _NORMAL
            for field, item in _proto_fields(value):
                if field == 1:
                    piece = bytes(item).decode("utf-8")
                elif field == 2:
                    (score,) = struct.unpack("<f", item)
                elif field == 3:
                    kind = item
            if piece is None:
                raise ValueError(f"piece {len(pieces)} has no text")
            pieces.append((piece, score, kind))
        elif number == 2:  # ModelProto.trainer_spec
            model_type = dict(_proto_fields(value)).get(3, 1)
        elif number == 3:  # ModelProto.normalizer_spec
            charsmap = bytes(dict(_proto_fields(value)).get(2, b""))
    if not pieces:
        raise ValueError("no vocabulary pieces")
    if model_type != 1:
        raise ValueError(f"model type {model_type} is not unigram (1)")
    return pieces, charsmap


def _backend_from_spm(data):
    from tokenizers import AddedToken, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import Unigram

    pieces, charsmap = parse_sentencepiece_model(data)
    unk_ids = [i for i, (_, _, kind) in enumerate(pieces) if kind == _UNKNOWN]
    extra = [f"<extra_id_{i}>" for i in reversed(range(EXTRA_IDS))]
    vocab = [(p, s) for p, s, _ in pieces] + [(t, 0.0) for t in extra]
    backend = RustTokenizer(
        Unigram(vocab, unk_id=unk_ids[0] if unk_ids else None, byte_fallback=False)
    )
    if charsmap:
        backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(
                replacement="▁", prepend_scheme="always", split=True
            ),
        ]
    )
    special = [p for p, _, kind in pieces if kind in (_UNKNOWN, _CONTROL)]
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special + extra]
    )
    user = [p for p, _, kind in pieces if kind == _USER_DEFINED]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return backend


@register
class T5Tokenizer(Tokenizer):
    """T5 SentencePiece tokenizer with fixed-length int32 output.

    Args:
        proto: path to `spiece.model` or `tokenizer.json`.
        sequence_length: output length; SD3 uses 256 (diffusers'
            `max_sequence_length`).

    Built without `proto` (e.g. by `from_config`), it needs
    `load_assets(dir)` before use; `dir` holds `spiece.model` or
    `tokenizer.json`.

    Examples:

    >>> import json, os, tempfile
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0),
    ...          ("▁b", -2.0)]
    >>> rust = Tokenizer(models.Unigram(vocab, unk_id=2))
    >>> rust.pre_tokenizer = pre_tokenizers.Metaspace()
    >>> path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
    >>> rust.save(path)
    >>> tokenizer = T5Tokenizer(path, sequence_length=5)
    >>> tokenizer(["a b", "b a b a b a"])
    array([[3, 4, 1, 0, 0],
           [4, 3, 4, 3, 1]], dtype=int32)
    """

    asset_files = (SPM_FILE,)

    def __init__(self, proto=None, sequence_length=256):
        if type(sequence_length) is not int:
            raise TypeError(
                "`sequence_length` must be an int; got "
                f"{type(sequence_length).__name__}."
            )
        if sequence_length < 1:
            raise ValueError(f"`sequence_length` must be >= 1; got {sequence_length}.")
        self.sequence_length = sequence_length
        self._backend = self._proto_bytes = None
        if proto is not None:
            self.set_proto(proto)

    def set_proto(self, proto):
        """Load `spiece.model` or `tokenizer.json` (by extension)."""
        if not isinstance(proto, (str, os.PathLike)):
            raise TypeError(
                "`proto` must be a path to spiece.model or tokenizer.json; got "
                f"{type(proto).__name__}."
            )
        path = os.fspath(proto)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"T5 tokenizer file not found: {path}")
        with open(path, "rb") as f:
            data = f.read()
        is_json = path.endswith(".json")
        try:
            if is_json:
                from tokenizers import Tokenizer as RustTokenizer

                backend = RustTokenizer.from_str(data.decode("utf-8"))
                backend.no_padding()
                backend.no_truncation()
            else:
                backend = _backend_from_spm(data)
        except Exception as e:  # parse errors come in many types
            kind = "tokenizer.json" if is_json else "SentencePiece model"
            raise ValueError(f"{path} is not a valid {kind}: {e}") from None
        ids = {t: backend.token_to_id(t) for t in (PAD_TOKEN, EOS_TOKEN)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(missing)} token.")
        self._backend, self._proto_bytes = backend, data
        self.asset_files = (JSON_FILE if is_json else SPM_FILE,)
        self.pad_token_id, self.end_token_id = ids[PAD_TOKEN], ids[EOS_TOKEN]

    @property
    def vocabulary_size(self):
        return None if self._backend is None else self._backend.get_vocab_size()

    def tokenize(self, prompts):
        """Ids of shape `(len(prompts), sequence_length)`, int32."""
        prompts = validate_prompts(prompts, "prompts")
        if self._backend is None:
            raise ValueError(
                "This T5Tokenizer has no vocabulary: pass `proto` or call "
                "`load_assets(dir)`."
            )
        length = self.sequence_length
        out = np.full((len(prompts), length), self.pad_token_id, np.int32)
        if not prompts:
            return out
        encodings = self._backend.encode_batch_fast(prompts, add_special_tokens=False)
        for row, encoding in enumerate(encodings):
            ids = encoding.ids[: length - 1]  # keep the last slot for EOS
            out[row, : len(ids)] = ids
            out[row, len(ids)] = self.end_token_id
        return out

    def get_config(self):
        return {"sequence_length": self.sequence_length}

    def save_assets(self, dir_path):
        if self._proto_bytes is None:
            raise ValueError("This T5Tokenizer has no vocabulary to save.")
        os.makedirs(dir_path, exist_ok=True)
        with open(os.path.join(dir_path, self.asset_files[0]), "wb") as f:
            f.write(self._proto_bytes)

    def load_assets(self, dir_path):
        """Load `spiece.model`, or else `tokenizer.json`, from `dir_path`."""
        for name in (SPM_FILE, JSON_FILE):
            path = os.path.join(dir_path, name)
            if os.path.isfile(path):
                return self.set_proto(path)
        raise FileNotFoundError(
            f"No T5 tokenizer file in {dir_path}: expected {SPM_FILE} or {JSON_FILE}."
        )

    def missing_assets(self, dir_path):
        """`[]` when `dir_path` holds either accepted file, else both names."""
        names = (SPM_FILE, JSON_FILE)
        if any(os.path.isfile(os.path.join(dir_path, n)) for n in names):
            return []
        return list(names)
