"""python_utils: `read_json` names the corrupt file the caller describes."""

import doctest

import pytest

from keras_diffusion.utils import python_utils
from keras_diffusion.utils.python_utils import read_json


def test_read_json(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert read_json(str(good), "unused") == {"a": [1, 2]}
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ValueError, match="^Corrupt binary.json: ") as info:
        read_json(str(binary), "Corrupt binary.json")
    assert isinstance(info.value.__cause__, UnicodeDecodeError)
    with pytest.raises(FileNotFoundError):
        read_json(str(tmp_path / "missing.json"), "unused")


def test_docstring_examples():
    result = doctest.testmod(python_utils, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
