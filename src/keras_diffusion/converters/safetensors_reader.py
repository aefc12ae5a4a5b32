"""A lazy, validating safetensors reader that needs no framework.

`safetensors.safe_open(framework="numpy")` cannot return bfloat16, and it
reads the header without checking that the data is all there. This reader
memory-maps each file, checks every tensor's byte range against the file
size when the file is opened, and hands out one tensor at a time, so a
conversion never holds more than one source tensor beyond the model itself.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from keras_diffusion.utils.weight_loading import assign_array

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    """A safetensors file is corrupt, truncated or not safetensors at all."""


def read_header(path):
    """`(header, data_start)` of a safetensors file, every entry checked.

    `header` maps each tensor name to its `dtype`, `shape` and
    `data_offsets` (relative to `data_start`), without `__metadata__`.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_length = f.read(8)
        if len(raw_length) < 8:
            raise SafetensorsError(f"{path} is not a safetensors file (too short).")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > size - 8 or header_length > 100_000_000:
            raise SafetensorsError(
                f"{path} is not a valid safetensors file: its header claims "
                f"{header_length} bytes but the file has {size}."
            )
        try:
            header = json.loads(f.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path} has a corrupt safetensors header.") from e
    data_start = 8 + header_length
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} has a safetensors header that is no mapping.")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not _well_formed(info):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed entry.")
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}."
            )
        begin, end = info["data_offsets"]
        itemsize = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).itemsize
        expected = int(np.prod(info["shape"], dtype=np.int64)) * itemsize
        if end - begin != expected or data_start + end > size:
            raise SafetensorsError(
                f"{path} is truncated or corrupt: tensor {name!r} needs bytes "
                f"{data_start + begin}..{data_start + end}, file has {size}."
            )
    return header, data_start


def _well_formed(info):
    def whole(values, length=None):
        return (
            isinstance(values, list)
            and (length is None or len(values) == length)
            and all(isinstance(v, int) and v >= 0 for v in values)
        )

    return (
        isinstance(info, dict)
        and whole(info.get("shape"))
        and whole(info.get("data_offsets"), 2)
        and info["data_offsets"][0] <= info["data_offsets"][1]
    )


class TensorSource:
    """Read-only mapping `name -> np.ndarray`, loaded lazily.

    Build it from safetensors files with `TensorSource.from_files(paths)`, or
    from in-memory arrays with `TensorSource.from_dict(arrays)` (tests, and
    converted torch state dicts). `prefix` narrows a view to one component
    of a single-file checkpoint: `source.scoped("first_stage_model.")`.
    """

    def __init__(self, entries, prefix=""):
        self._entries = entries  # name -> (path, info, data_start) or ndarray
        self._prefix = prefix

    @classmethod
    def from_files(cls, paths):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        entries = {}
        for path in paths:
            path = os.fspath(path)
            header, data_start = read_header(path)
            for name, info in header.items():
                entries[name] = (path, info, data_start)
        return cls(entries)

    @classmethod
    def from_dict(cls, arrays):
        """A source over in-memory arrays; `get` hands out copies of them.

        Examples:

        >>> arrays = {"w": np.zeros(2)}
        >>> source = TensorSource.from_dict(arrays)
        >>> source.get("w")[0] = 1.0
        >>> float(arrays["w"][0]), float(source.get("w")[0])
        (0.0, 0.0)
        """
        return cls({k: np.asarray(v) for k, v in arrays.items()})

    def scoped(self, prefix):
        return TensorSource(self._entries, self._prefix + prefix)

    def keys(self):
        n = len(self._prefix)
        return [k[n:] for k in self._entries if k.startswith(self._prefix)]

    def __contains__(self, name):
        return self._prefix + name in self._entries

    def __len__(self):
        return len(self.keys())

    def shape(self, name):
        entry = self._entry(name)
        if isinstance(entry, np.ndarray):
            return tuple(entry.shape)
        return tuple(entry[1]["shape"])

    def get(self, name):
        """Return tensor `name` as a numpy array (a fresh copy)."""
        entry = self._entry(name)
        if isinstance(entry, np.ndarray):
            return entry.copy()
        path, info, data_start = entry
        begin, end = info["data_offsets"]
        # Read straight into the array's memory: one copy of the tensor, not
        # a bytes object and then an array.
        array = np.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
        with open(path, "rb", buffering=0) as f:
            f.seek(data_start + begin)
            view = memoryview(array.reshape(-1).view(np.uint8))
            done = 0
            while done < end - begin:
                count = f.readinto(view[done:])
                if not count:
                    raise SafetensorsError(
                        f"{path} was truncated while tensor {name!r} was read."
                    )
                done += count
        return array

    def _entry(self, name):
        key = self._prefix + name
        if key not in self._entries:
            raise KeyError(
                f"Tensor {key!r} is missing from the checkpoint "
                f"({len(self._entries)} tensors present)."
            )
        return self._entries[key]


def assign(variable, array, name):
    """Assign `array` to a Keras variable, checking the shape first."""
    array = np.asarray(array)
    if tuple(variable.shape) != tuple(array.shape):
        raise ValueError(
            f"Checkpoint tensor {name!r} has shape {tuple(array.shape)}, but "
            f"the model expects {tuple(variable.shape)} for {variable.path!r}."
        )
    if np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16:
        array = array.astype(np.float32, copy=False)  # no copy of float32 data
    assign_array(variable, array)
