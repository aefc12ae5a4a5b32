"""Which CPU kernel pays on this CPU.

The fast paths (`fast_ops`, `fast_attention`, `fast_conv`) ask these
questions of torch's CPU build (its CPU capability and oneDNN's bfloat16
support), and of tensorflow's (whether its oneDNN kernels run), instead of
assuming one machine: what won on an AVX-512 Xeon with
AMX lost, or did not run at all, on an AVX2 EPYC (Zen 3). The answers are
cached per process; tests patch `cpu_has_avx512`, `onednn_has_bfloat16`
and `mkl_on_non_intel_cpu` to take the other machine's paths.
"""

import functools

from keras_diffusion.utils.backend import backend_name

# The largest float32 kernel (entries) that `linear` hands to oneDNN's
# matmul on torch where torch's float32 BLAS is MKL on an Intel CPU: 512 x
# 2048. On an AVX-512 Xeon (an ad hoc sweep), the fused matmul + GELU won at
# 384 x 1536, tied at 512 x 2048 and lost from 768 x 3072 up: it re-lays
# out the kernel on every call. Elsewhere see `mkl_on_non_intel_cpu`.
ONEDNN_FLOAT32_MAX_KERNEL = 2**20


def emulated_bfloat16(x):
    """Whether `x` is a bfloat16 torch CPU tensor on a CPU whose oneDNN has
    no bfloat16 kernels (neither AVX512-BF16 nor AMX).

    There, torch's bfloat16 kernels fall back to generic code: on an AVX2
    EPYC a (2048 x 384) @ (384 x 1536) matmul took 1.99 s on the stored
    `(in, out)` kernel and 0.18 s on an `(out, in)` one (diffusers' layout),
    against 0.04 s in float32, upcasts and downcast included; bfloat16
    attention was 1.4x float32's (ad hoc). The fast paths then compute in
    float32 and round the result to bfloat16: the numbers of a bfloat16
    matmul with float32 accumulation, up to summation order.

    Examples:

    >>> import keras
    >>> emulated_bfloat16(keras.ops.ones((2,), "float32"))
    False
    """
    if backend_name() != "torch":
        return False
    import torch

    return (
        isinstance(x, torch.Tensor)
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not onednn_has_bfloat16()
    )


def onednn_matmul_usable(x, kernel):
    """Whether torch's oneDNN matmul (with or without a GELU post-op) should
    run: inference on a dense CPU input where `onednn_matmul_pays` for its
    dtype and kernel, and a
    contiguous kernel (other strides take oneDNN's reference kernel,
    hundreds of times slower)."""
    import torch

    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and kernel.is_contiguous()
        and x.is_contiguous()
        and onednn_matmul_pays(x.dtype, kernel.numel())
    )


def onednn_matmul_pays(dtype, kernel_entries):
    """Whether oneDNN's matmul beats torch's `addmm` on this CPU, with a
    GELU post-op against `addmm`, then GELU (see `fast_ops.linear`).

    bfloat16: wherever oneDNN has bfloat16 kernels (AVX512-BF16 or AMX;
    elsewhere it cannot build the primitive at all). float32: on AVX-512
    CPUs only, for kernels of at most `ONEDNN_FLOAT32_MAX_KERNEL` entries,
    or of any size where `mkl_on_non_intel_cpu`; on
    an AVX2 CPU (AMD EPYC, Zen 3) the fused op was slower at every size
    (`benchmarks/linear_speed.py` and an ad hoc rerun: 384 -> 1536 on
    2,048 rows, 41.6-42.8 ms fused against 32.3-32.6 for `addmm`, then
    GELU).

    Examples:

    >>> import torch
    >>> onednn_matmul_pays(torch.float16, 16)  # float16 takes `addmm` anywhere
    False
    """
    import torch

    if dtype == torch.bfloat16:
        return onednn_has_bfloat16()
    return (
        dtype == torch.float32
        and cpu_has_avx512()
        and (kernel_entries <= ONEDNN_FLOAT32_MAX_KERNEL or mkl_on_non_intel_cpu())
    )


@functools.cache
def mkl_on_non_intel_cpu():
    """Whether torch's float32 BLAS is MKL on a CPU that is not Intel's.

    MKL runs slower code there: on an AVX-512 EPYC (Zen 5) torch's float32
    matmul peaked at 178-189 GFLOP/s against 400-426 for oneDNN's (in
    tensorflow), and oneDNN's matmul beat `addmm` at every size up to
    SD3-medium's 1536 -> 6144 (`benchmarks/linear_speed.py --hidden 1536`);
    with it the `wide` MMDiT step went from 0.877-0.923x diffusers' to
    0.811-0.833x (`benchmarks/step_ab.py --folder /tmp/kd-speed-wide`, two
    runs alternating with the limit everywhere). The vendor is read from `/proc/cpuinfo`
    (Linux) or `platform.processor()`; unknown counts as Intel (the limit
    holds).
    """
    import platform

    import torch

    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            described = cpuinfo.read(4096)
    except OSError:
        described = platform.processor()
    return names_a_non_intel_cpu(described)


def names_a_non_intel_cpu(described):
    """Whether a CPU description names a vendor other than Intel.

    Examples:

    >>> names_a_non_intel_cpu("vendor_id\t: AuthenticAMD")
    True
    >>> names_a_non_intel_cpu("Intel64 Family 6 Model 143, GenuineIntel")
    False
    >>> names_a_non_intel_cpu("")
    False
    """
    others = ("AuthenticAMD", "HygonGenuine", "CentaurHauls")
    return "GenuineIntel" not in described and any(v in described for v in others)


@functools.cache
def onednn_has_bfloat16():
    import torch

    return torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@functools.cache
def cpu_has_avx512():
    import torch

    return torch.backends.mkldnn.is_available() and (
        torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    )


@functools.cache
def tf_onednn_bfloat16():
    """Whether tensorflow's bfloat16 softmax and matmuls are oneDNN's: the
    softmax computes in float32 and rounds once, and matmuls accumulate in
    float32. That holds where tensorflow's oneDNN kernels are on
    (`TF_ENABLE_ONEDNN_OPTS`, on by default on x86) and no GPU is visible
    (whose kernels promise no such thing). Else `fast_attention` upcasts the
    scores, and `fast_conv.group_norm` its input.
    """
    import tensorflow as tf

    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # a private module; without it, the safe path
        return False
    return bool(
        _pywrap_util_port.IsMklEnabled()
    ) and not tf.config.list_logical_devices("GPU")
