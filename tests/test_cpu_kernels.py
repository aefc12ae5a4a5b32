"""The CPU facts behind the torch fast paths (`utils.cpu_kernels`)."""

import doctest

import keras
import pytest
from keras import ops

from keras_diffusion.utils import cpu_kernels


def test_emulated_bfloat16_only_for_bfloat16_torch_tensors(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "onednn_has_bfloat16", lambda: False)
    on_torch = keras.backend.backend() == "torch"
    assert cpu_kernels.emulated_bfloat16(ops.ones((2,), "bfloat16")) == on_torch
    assert not cpu_kernels.emulated_bfloat16(ops.ones((2,), "float32"))
    monkeypatch.setattr(cpu_kernels, "onednn_has_bfloat16", lambda: True)
    assert not cpu_kernels.emulated_bfloat16(ops.ones((2,), "bfloat16"))


@pytest.mark.parametrize("mkl_elsewhere", [False, True])
@pytest.mark.parametrize("avx512", [False, True])
@pytest.mark.parametrize("bfloat16_kernels", [False, True])
def test_onednn_matmul_pays_by_dtype_kernel_size_and_cpu(
    avx512, bfloat16_kernels, mkl_elsewhere, monkeypatch
):
    # `mkl_elsewhere`: torch's MKL on a non-Intel CPU, where oneDNN's float32
    # matmul pays at every size.
    torch = pytest.importorskip("torch")  # the CPU facts are torch's
    monkeypatch.setattr(cpu_kernels, "cpu_has_avx512", lambda: avx512)
    monkeypatch.setattr(cpu_kernels, "onednn_has_bfloat16", lambda: bfloat16_kernels)
    monkeypatch.setattr(cpu_kernels, "mkl_on_non_intel_cpu", lambda: mkl_elsewhere)
    limit = cpu_kernels.ONEDNN_FLOAT32_MAX_KERNEL
    assert cpu_kernels.onednn_matmul_pays(torch.float32, limit) == avx512
    large = cpu_kernels.onednn_matmul_pays(torch.float32, limit + 1)
    assert large == (avx512 and mkl_elsewhere)
    pays = cpu_kernels.onednn_matmul_pays(torch.bfloat16, 10 * limit)
    assert pays == bfloat16_kernels
    assert not cpu_kernels.onednn_matmul_pays(torch.float16, 16)


def test_non_intel_vendors_from_cpu_descriptions():
    linux = "processor\t: 0\nvendor_id\t: {}\ncpu family\t: 26\n"
    assert cpu_kernels.names_a_non_intel_cpu(linux.format("AuthenticAMD"))
    assert cpu_kernels.names_a_non_intel_cpu(linux.format("HygonGenuine"))
    assert not cpu_kernels.names_a_non_intel_cpu(linux.format("GenuineIntel"))
    windows = "AMD64 Family 25 Model 1 Stepping 1, AuthenticAMD"
    assert cpu_kernels.names_a_non_intel_cpu(windows)
    assert not cpu_kernels.names_a_non_intel_cpu("arm")  # unknown: Intel's rule


def test_cpu_facts_are_booleans():
    pytest.importorskip("torch")
    assert isinstance(cpu_kernels.cpu_has_avx512(), bool)
    assert isinstance(cpu_kernels.onednn_has_bfloat16(), bool)
    assert isinstance(cpu_kernels.mkl_on_non_intel_cpu(), bool)


def test_docstring_examples_run():
    pytest.importorskip("torch")
    result = doctest.testmod(cpu_kernels)
    assert result.attempted >= 2 and result.failed == 0
