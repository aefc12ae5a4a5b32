"""safetensors_reader: lazy, validated reads of every dtype, into fresh arrays."""

import doctest
import json
import struct

import ml_dtypes
import numpy as np

from keras_diffusion.converters import safetensors_reader
from keras_diffusion.converters.safetensors_reader import TensorSource


def test_reader_reads_every_dtype_into_fresh_arrays(tmp_path):
    """Each tensor is read straight into a new array (bfloat16 included)."""
    arrays = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bf16": np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16),
        "i64": np.arange(3, dtype=np.int64),
        "empty": np.zeros((0, 4), np.float16),
    }
    tags = {"f32": "F32", "bf16": "BF16", "i64": "I64", "empty": "F16"}
    header, offset = {}, 0
    for name, array in arrays.items():
        header[name] = {
            "dtype": tags[name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for array in arrays.values():
            f.write(array.tobytes())
    source = TensorSource.from_files(path)
    for name, array in arrays.items():
        got = source.get(name)
        assert got.dtype == array.dtype and got.flags.writeable, name
        np.testing.assert_array_equal(got, array)
    got = source.get("f32")
    got[...] = 7  # a fresh array: the next read is unaffected
    assert source.get("f32")[0, 0] == 0.0


def test_docstring_examples():
    result = doctest.testmod(safetensors_reader, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
