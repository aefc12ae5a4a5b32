"""A preset's weights as safetensors, one tensor per variable, by its path.

    model.safetensors                    every weight, below the shard size
    model.safetensors.index.json         or: an index {"metadata": {...},
    model-00001-of-00003.safetensors         "weight_map": {name: file}}
    ...                                      and its shards (Hugging Face's
                                             layout)

Each tensor is stored under its variable's path (`mmdit/block_0/x_qkv/kernel`)
in the variable's own dtype, so any safetensors reader can open the files and
a bfloat16 preset is half the size of a float32 one.

Loading checks the index and every header first (the byte ranges, the names
against the model's variables, the shapes), so a corrupt or mismatched
preset fails before any weight is assigned. It then memory-maps each file
copy-on-write. On tensorflow and torch a weight stored in its variable's
dtype and, for tensorflow, 64-byte aligned (in files we write, every
tensor whose size is a multiple of 64 bytes) becomes the variable's memory
itself (`adopt_array`): nothing is copied or faulted in at load, and a
write copies only the pages it touches. The file must then not be rewritten
in place while the model lives (`save_to_preset` writes a new one). Any
other weight is copied once from the mapping, its pages dropped once
assigned. Keras' `model.weights.h5` reads each tensor into an array and
copies it twice more (docs/performance.md, "presets hold safetensors").
"""

import contextlib
import json
import mmap
import os
import re

import keras
import numpy as np

from keras_diffusion.converters.safetensors_reader import (
    SAFETENSORS_DTYPES,
    SafetensorsError,
    read_header,
)
from keras_diffusion.utils.backend import release_freed_memory
from keras_diffusion.utils.weight_loading import adopt_array, assign_array

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Shard above this many bytes of weights, in shards of at most SHARD_BYTES
# (one tensor larger than that gets a shard of its own).
SHARD_THRESHOLD_BYTES = 4 * 1024**3
SHARD_BYTES = 2 * 1024**3
# Where the tensors start in a file we write (tensorflow adopts only memory
# aligned to 64 bytes).
DATA_ALIGNMENT = 64
_NAMES_BY_DTYPE = {np.dtype(t): name for name, t in SAFETENSORS_DTYPES.items()}


def has_weights(folder):
    names = (INDEX_FILE, WEIGHTS_FILE)
    return any(os.path.isfile(os.path.join(folder, name)) for name in names)


def _named_variables(model):
    variables = {}
    for variable in model.weights:
        if variable.path in variables:
            raise ValueError(
                f"Two weights of {model.name!r} share the path {variable.path!r}; "
                "every layer needs a name unique among its siblings."
            )
        variables[variable.path] = variable
    return variables


def _dtype_name(variable):
    dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
    if dtype not in _NAMES_BY_DTYPE:
        raise ValueError(f"{variable.path!r} has dtype {dtype}; safetensors lacks it.")
    return _NAMES_BY_DTYPE[dtype]


def _nbytes(variable):
    dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
    return int(np.prod(variable.shape, dtype=np.int64)) * dtype.itemsize


def _write_file(path, variables):
    """One safetensors file of `variables` (name -> variable).

    Laid out for loading without a copy (`adopt_array`): the data starts
    `DATA_ALIGNMENT`-aligned in the file (the header is padded with spaces),
    and the tensors whose sizes are multiples of it come first, so each of
    them starts aligned too. safetensors allows no gaps between tensors, so
    the few of other sizes (a 3-channel bias) go last.
    """
    variables = dict(
        sorted(
            variables.items(), key=lambda item: _nbytes(item[1]) % DATA_ALIGNMENT != 0
        )
    )
    header, offset = {"__metadata__": {"format": "keras_diffusion"}}, 0
    for name, variable in variables.items():
        size = _nbytes(variable)
        header[name] = {
            "dtype": _dtype_name(variable),
            "shape": [int(d) for d in variable.shape],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for variable in variables.values():
            value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
            f.write(value.reshape(-1).view(np.uint8).data)


def save_weights(model, folder):
    """Write `model`'s weights into `folder` (one file, or shards + index)."""
    variables = _named_variables(model)
    total = sum(_nbytes(v) for v in variables.values())
    if total <= SHARD_THRESHOLD_BYTES:
        _write_file(os.path.join(folder, WEIGHTS_FILE), variables)
        return
    shards, size = [{}], 0
    for name, variable in variables.items():
        if shards[-1] and size + _nbytes(variable) > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = variable
        size += _nbytes(variable)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_file(os.path.join(folder, file), shard)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def _index_files(folder):
    """The shard of every tensor name, from a checked index."""
    try:
        with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise SafetensorsError(f"{INDEX_FILE} is corrupt: {e}") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise SafetensorsError(f"{INDEX_FILE} has no 'weight_map' of tensor names.")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not SHARD_NAME.match(file):
            raise SafetensorsError(
                f"{INDEX_FILE} maps {name!r} to {file!r}, which is not a shard "
                "name of the form 'model-00001-of-00002.safetensors'."
            )
        if not os.path.isfile(os.path.join(folder, file)):
            raise SafetensorsError(f"{INDEX_FILE} lists {file!r}, which is missing.")
    return weight_map


def _read_entries(folder):
    """name -> (file, header info, data start), every header checked."""
    if os.path.isfile(os.path.join(folder, INDEX_FILE)):
        weight_map = _index_files(folder)
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, [WEIGHTS_FILE]
    entries = {}
    for file in files:
        path = os.path.join(folder, file)
        header, data_start = read_header(path)
        for name, info in header.items():
            if name in entries or (weight_map and weight_map.get(name) != file):
                raise SafetensorsError(
                    f"Tensor {name!r} of {file!r} is not where the index puts it."
                )
            entries[name] = (path, info, data_start)
    if weight_map and set(weight_map) != set(entries):
        raise SafetensorsError(f"{INDEX_FILE} lists tensors its shards lack.")
    return entries


def _check_names(entries, variables):
    missing = [n for n in variables if n not in entries]
    unexpected = [n for n in entries if n not in variables]
    if missing or unexpected:
        raise ValueError(
            f"The weights do not match the model: {len(missing)} of its weights are "
            f"missing (first: {missing[:3]}) and {len(unexpected)} tensors are "
            f"unknown to it (first: {unexpected[:3]})."
        )
    for name, variable in variables.items():
        shape = tuple(entries[name][1]["shape"])
        if shape != tuple(variable.shape):
            raise ValueError(
                f"Tensor {name!r} has shape {shape}, but the model's weight has "
                f"shape {tuple(variable.shape)}."
            )


def load_weights(model, folder):
    """Assign the weights in `folder` to every weight of `model`.

    Raises `ValueError` (corrupt files, missing or unknown tensors, shape
    mismatches) before assigning anything. A tensor stored in another float
    dtype than its variable's (a float32 preset loaded as bfloat16) is cast.
    """
    variables = _named_variables(model)
    entries = _read_entries(folder)
    _check_names(entries, variables)
    by_file = {}
    for name, (path, info, data_start) in entries.items():
        by_file.setdefault(path, []).append((name, info, data_start))
    for path, tensors in by_file.items():
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        adopted = False
        try:
            for name, info, data_start in tensors:
                adopted |= _assign_mapped(variables[name], mapping, info, data_start)
        except BaseException:
            with contextlib.suppress(BufferError):  # the error's frames view it
                mapping.close()
            raise
        if not adopted:
            mapping.close()  # a BufferError here: a weight still views the file
        # Else the weights that adopted their tensors keep the mapping open;
        # it closes once the last of them lets go.
    release_freed_memory()


def _assign_mapped(variable, mapping, info, data_start):
    """Give `variable` its tensor from `mapping`; returns whether it adopted
    the mapped memory itself (`adopt_array`) instead of a copy."""
    begin, end = (data_start + o for o in info["data_offsets"])
    dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
    array = np.frombuffer(
        mapping, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin
    ).reshape(info["shape"])
    if adopt_array(variable, array):
        return True
    if not array.flags.aligned:  # after a tensor of odd size in another dtype
        array = array.copy()
    wanted = np.dtype(keras.backend.standardize_dtype(variable.dtype))
    assign_array(variable, array.astype(wanted, copy=False))
    del array  # the mapping closes only once no array views it
    # Copy-on-write pages never written: dropping them only forgets the
    # file's cached bytes, so the mapping adds about one tensor to the peak.
    start = begin - begin % mmap.PAGESIZE
    if end > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
    return False
