"""torch CPU kernels behind `utils/fast_ops.py` and `utils/fast_attention.py`.

    python benchmarks/linear_speed.py [--dtype float32 --dtype bfloat16]
        [--hidden 384 --hidden 1536]

One block's matmuls for the `bench` config (hidden 384; `--hidden 1536` is
the `wide` config, SD3-medium's width; CFG batch 2: 2,048 image tokens, 308
text tokens), each three ways: `F.linear` on the
transposed kernel (what a Keras `(in, out)` kernel gives `F.linear`),
`addmm` on the kernel as stored, and oneDNN's matmul (`fast_ops.linear`
picks between the last two), and for the MLP's
first layer also oneDNN's matmul with a GELU post-op (`fast_ops.linear(...,
"gelu_tanh")` at bfloat16 inference) against matmul then GELU, and then
GELU in place (float32 inference). Then joint attention
(2 x 1,178 tokens, 6 heads of 64) on token-major views, as a token-axis
concatenation gives them, against heads-first memory
(`fast_attention.joint_attention`).
Median of 30 runs each, in milliseconds.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

IMAGE_TOKENS, TEXT_TOKENS, HEAD_DIM = 2048, 308, 64


def median_ms(fn, runs=30):
    fn()
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def onednn_ms(x, kernel, bias, post_op, algorithm):
    """oneDNN's matmul (`mkldnn._linear_pointwise`, inference only) on the
    transposed view of the stored kernel, with `post_op` fused."""
    with torch.no_grad():
        return median_ms(
            lambda: torch.ops.mkldnn._linear_pointwise(
                x, kernel.T, bias, post_op, [], algorithm
            )
        )


def matmuls(dtype, d):
    rows = []
    for name, m, k, n in [
        ("image q/k/v", IMAGE_TOKENS, d, 3 * d),
        ("text q/k/v", TEXT_TOKENS, d, 3 * d),
        ("attention output", IMAGE_TOKENS, d, d),
        ("MLP out", IMAGE_TOKENS, 4 * d, d),
    ]:
        x = torch.randn(m, k, dtype=dtype)
        kernel = torch.randn(k, n, dtype=dtype) / k**0.5
        bias = torch.randn(n, dtype=dtype)
        rows.append(
            (
                name,
                median_ms(lambda x=x, w=kernel, b=bias: F.linear(x, w.T, b)),
                median_ms(lambda x=x, w=kernel, b=bias: torch.addmm(b, x, w)),
                onednn_ms(x, kernel, bias, "none", ""),
            )
        )
    x = torch.randn(IMAGE_TOKENS, d, dtype=dtype)
    kernel = torch.randn(d, 4 * d, dtype=dtype) / d**0.5
    bias = torch.randn(4 * d, dtype=dtype)
    fused = onednn_ms(x, kernel, bias, "gelu", "tanh")
    split = median_ms(lambda: F.gelu(torch.addmm(bias, x, kernel), approximate="tanh"))
    in_place = median_ms(
        lambda: torch.ops.aten.gelu_(torch.addmm(bias, x, kernel), approximate="tanh")
    )
    return rows, (split, fused, in_place)


def attention(dtype, hidden):
    b, t, dh = 2, IMAGE_TOKENS // 2 + TEXT_TOKENS // 2, HEAD_DIM
    h = hidden // dh
    image = torch.randn(b, IMAGE_TOKENS // 2, 3, h, dh, dtype=dtype)
    text = torch.randn(b, TEXT_TOKENS // 2, 3, h, dh, dtype=dtype)

    def token_major():
        # A token-axis concatenation per q / k / v, then heads-first views.
        q, k, v = (torch.cat([image[:, :, i], text[:, :, i]], 1) for i in range(3))
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    def heads_first():
        q, k, v = (
            torch.cat([p[:, :, i].transpose(1, 2) for p in (image, text)], 2)
            for i in range(3)
        )
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    assert token_major().shape == (b, t, h, dh)
    return median_ms(token_major), median_ms(heads_first)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", action="append", choices=("float32", "bfloat16"))
    parser.add_argument("--hidden", type=int, action="append")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(
        "| hidden | dtype | op | F.linear(x, kernel.T) ms | addmm(bias, x, kernel) ms "
        "| oneDNN matmul ms |"
    )
    print("|---|---|---|---|---|---|")
    results = {}
    for hidden in args.hidden or [384]:
        for name in args.dtype or ["float32", "bfloat16"]:
            dtype = getattr(torch, name)
            rows, gelu = matmuls(dtype, hidden)
            results[hidden, name] = (gelu, attention(dtype, hidden))
            for op, plain, add, onednn in rows:
                print(
                    f"| {hidden} | {name} | {op} | {plain:.2f} | {add:.2f} "
                    f"| {onednn:.2f} |"
                )
    print(
        "\n| hidden | dtype | MLP in: addmm, then GELU ms | oneDNN matmul+GELU ms "
        "| addmm, then GELU in place ms "
        "| joint attention, token-major ms | heads-first ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for (hidden, name), ((split, fused, inplace), (token, heads)) in results.items():
        print(
            f"| {hidden} | {name} | {split:.2f} | {fused:.2f} | {inplace:.2f} "
            f"| {token:.2f} | {heads:.2f} |"
        )


if __name__ == "__main__":
    main()
