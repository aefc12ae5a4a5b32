"""Preset weights as safetensors: the reference reader agrees, errors are clear."""

import json
import os

import keras
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import toy_models

import keras_diffusion as kd
from keras_diffusion.converters.safetensors_reader import read_header
from keras_diffusion.presets import weights_io


def _values(model):
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


def _saved(tmp_path, dtype=None):
    backbone = toy_models.make_toy_task(dtype=dtype).backbone
    folder = tmp_path / "p"
    backbone.save_to_preset(folder)
    return backbone, folder


def _rewrite(path, arrays):
    """Rewrite a safetensors file with the reference writer."""
    safetensors.numpy.save_file(arrays, str(path))


def test_reference_reader_reads_our_file(tmp_path):
    backbone, folder = _saved(tmp_path)
    expected = _values(backbone)
    stored = safetensors.numpy.load_file(str(folder / weights_io.WEIGHTS_FILE))
    assert set(stored) == set(expected) and len(expected) == 5
    for name, value in expected.items():
        assert stored[name].dtype == value.dtype
        np.testing.assert_array_equal(stored[name], value)
    loaded = kd.models.Backbone.from_preset(str(folder))
    for name, value in _values(loaded).items():
        np.testing.assert_array_equal(value, expected[name])


def test_bfloat16_weights_are_stored_as_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    backbone, folder = _saved(tmp_path, dtype="bfloat16")
    path = str(folder / weights_io.WEIGHTS_FILE)
    stored = safetensors.torch.load_file(path)
    for name, value in _values(backbone).items():
        assert stored[name].dtype == torch.bfloat16
        bits = stored[name].view(torch.int16).numpy()
        np.testing.assert_array_equal(bits, value.view(np.int16))
    loaded = kd.models.Backbone.from_preset(str(folder))
    assert loaded.dtype_policy.name == "bfloat16"
    for name, value in _values(loaded).items():
        assert value.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(value, _values(backbone)[name])


def test_float32_preset_loads_as_bfloat16(tmp_path):
    backbone, folder = _saved(tmp_path)
    loaded = kd.models.Backbone.from_preset(str(folder), dtype="bfloat16")
    for name, value in _values(loaded).items():
        expected = _values(backbone)[name].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(value, expected)


def test_sharded_weights_follow_the_hub_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_io, "SHARD_THRESHOLD_BYTES", 0)
    monkeypatch.setattr(weights_io, "SHARD_BYTES", 64)
    backbone, folder = _saved(tmp_path)
    index = json.loads((folder / weights_io.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(weights_io.SHARD_NAME.match(s) for s in shards)
    assert shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    sizes = {k: v.nbytes for k, v in _values(backbone).items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for shard in shards:
        stored = safetensors.numpy.load_file(str(folder / shard))
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(stored)
    loaded = kd.models.Backbone.from_preset(str(folder))
    for name, value in _values(loaded).items():
        np.testing.assert_array_equal(value, _values(backbone)[name])


def _mapped_ranges(path):
    """The address ranges where this process maps the file `path` (Linux)."""
    real, ranges = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def _address(variable):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return np.from_dlpack(tf.convert_to_tensor(variable)).ctypes.data
    if backend == "torch":
        return variable.value.data_ptr()
    return variable.value.unsafe_buffer_pointer()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux only")
def test_loaded_weights_use_the_mapped_file_where_the_backend_can(tmp_path):
    backbone, folder = _saved(tmp_path)
    path = folder / weights_io.WEIGHTS_FILE
    header, data_start = read_header(str(path))
    loaded = kd.models.Backbone.from_preset(str(folder))
    ranges = _mapped_ranges(path)
    in_file = {
        v.path: any(a <= _address(v) < b for a, b in ranges) for v in loaded.weights
    }
    backend = keras.backend.backend()
    # The toy's tensors of 12, 16 and 48 bytes leave some unaligned, which
    # tensorflow cannot adopt (torch can); jax always copies.
    aligned = {
        name: (data_start + info["data_offsets"][0]) % 64 == 0
        for name, info in header.items()
    }
    assert 0 < sum(aligned.values()) < len(aligned)
    expected = {
        "jax": dict.fromkeys(aligned, False),
        "tensorflow": aligned,
        "torch": dict.fromkeys(aligned, True),
    }[backend]
    assert in_file == expected
    for name, value in _values(loaded).items():
        np.testing.assert_array_equal(value, _values(backbone)[name])


def test_writes_to_loaded_weights_never_reach_the_file(tmp_path):
    backbone, folder = _saved(tmp_path)
    path = folder / weights_io.WEIGHTS_FILE
    before = path.read_bytes()
    loaded = kd.models.Backbone.from_preset(str(folder))
    for v in loaded.weights[:2]:  # in place where the backend can
        v.assign(keras.ops.convert_to_numpy(v) + 1.0)
    # An optimizer's update, as `fit` makes it (in place on tensorflow and
    # torch): w - 1.0 * 0.5.
    rest = loaded.weights[2:]
    grads = [keras.ops.full(v.shape, 0.5, "float32") for v in rest]
    keras.optimizers.SGD(learning_rate=1.0).apply_gradients(zip(grads, rest))
    assert path.read_bytes() == before
    moved = {v.path: 1.0 for v in loaded.weights[:2]}
    for name, value in _values(loaded).items():
        expected = _values(backbone)[name] + moved.get(name, -0.5)
        np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_saving_over_the_loaded_preset_keeps_both_intact(tmp_path):
    backbone, folder = _saved(tmp_path)
    loaded = kd.models.Backbone.from_preset(str(folder))
    loaded.encoder.kernel.assign(np.full((3, 4), 7.0, "float32"))
    loaded.save_to_preset(folder)  # a new file replaces the mapped one
    expected = {**_values(backbone), "encoder/kernel": np.full((3, 4), 7.0)}
    reloaded = kd.models.Backbone.from_preset(str(folder))
    for model in (loaded, reloaded):
        for name, value in _values(model).items():
            np.testing.assert_array_equal(value, expected[name])


def test_our_files_start_every_tensor_they_can_64_byte_aligned(tmp_path):
    backbone, folder = _saved(tmp_path)
    header, data_start = read_header(str(folder / weights_io.WEIGHTS_FILE))
    assert data_start % weights_io.DATA_ALIGNMENT == 0
    spans = sorted((info["data_offsets"], name) for name, info in header.items())
    sizes = [end - begin for (begin, end), _ in spans]
    whole = [size % weights_io.DATA_ALIGNMENT == 0 for size in sizes]
    # The tensors of whole multiples first, so each of them starts aligned.
    assert whole == sorted(whole, reverse=True) and 0 < sum(whole) < len(whole)
    for ((begin, _), _), aligned in zip(spans, whole):
        if aligned:
            assert begin % weights_io.DATA_ALIGNMENT == 0


def test_files_of_the_reference_writer_load(tmp_path):
    backbone, folder = _saved(tmp_path)
    path = folder / weights_io.WEIGHTS_FILE
    _rewrite(path, safetensors.numpy.load_file(str(path)))  # 8-byte aligned
    loaded = kd.models.Backbone.from_preset(str(folder))
    for name, value in _values(loaded).items():
        np.testing.assert_array_equal(value, _values(backbone)[name])


def _corrupt(folder, how):
    path = folder / weights_io.WEIGHTS_FILE
    arrays = safetensors.numpy.load_file(str(path))
    if how == "missing":
        arrays.pop("encoder/kernel")
        _rewrite(path, arrays)
    elif how == "unknown":
        _rewrite(path, {**arrays, "extra/kernel": np.zeros(2, "float32")})
    elif how == "shape":
        _rewrite(path, {**arrays, "encoder/bias": np.zeros(5, "float32")})
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:-8])
    elif how == "header":
        path.write_bytes(len(b"[1, 2]").to_bytes(8, "little") + b"[1, 2]")
    elif how == "offsets":
        header = {"encoder/kernel": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}
        raw = json.dumps(header).encode()
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "1 of its weights are missing.*encoder/kernel"),
        ("unknown", "1 tensors are unknown.*extra/kernel"),
        ("shape", r"'encoder/bias' has shape \(5,\).*\(4,\)"),
        ("truncated", "truncated or corrupt"),
        ("header", "no mapping"),
        ("offsets", "malformed entry"),
    ],
)
def test_bad_weights_fail_before_any_assignment(tmp_path, how, message):
    backbone, folder = _saved(tmp_path)
    _corrupt(folder, how)
    with pytest.raises(ValueError, match="Could not load weights.*model.safetensors"):
        kd.models.Backbone.from_preset(str(folder))
    target = toy_models.make_toy_task().backbone
    before = _values(target)
    with pytest.raises(ValueError, match=message):
        weights_io.load_weights(target, str(folder))
    for name, value in _values(target).items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ({"encoder/kernel": "../model-00001-of-00001.safetensors"}, "not a shard"),
        ({"encoder/kernel": "model-00009-of-00009.safetensors"}, "missing"),
        ([], "no 'weight_map'"),
    ],
)
def test_bad_index_is_refused(tmp_path, monkeypatch, weight_map, message):
    monkeypatch.setattr(weights_io, "SHARD_THRESHOLD_BYTES", 0)
    _, folder = _saved(tmp_path)
    index_path = folder / weights_io.INDEX_FILE
    index = json.loads(index_path.read_text())
    if isinstance(weight_map, dict):
        index["weight_map"].update(weight_map)
    else:
        index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        kd.models.Backbone.from_preset(str(folder))


def test_index_that_disagrees_with_its_shards_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_io, "SHARD_THRESHOLD_BYTES", 0)
    monkeypatch.setattr(weights_io, "SHARD_BYTES", 64)
    _, folder = _saved(tmp_path)
    index_path = folder / weights_io.INDEX_FILE
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{name!r} of .* is not where the index"):
        kd.models.Backbone.from_preset(str(folder))


def test_two_weights_with_one_path_are_refused(tmp_path):
    backbone = toy_models.make_toy_task().backbone
    backbone.decoder.kernel._path = backbone.encoder.kernel.path
    with pytest.raises(ValueError, match="share the path 'encoder/kernel'"):
        weights_io.save_weights(backbone, str(tmp_path))
