"""Tokens per second: our CLIPTokenizer vs transformers' CLIPTokenizer(Fast).

Tokenizes 10,000 distinct prompts from `tests/prompt_corpus.py` (about 70%
of them made only of "fast path" characters, the rest CJK, Greek, Cyrillic,
combining accents...) in one batch call to fixed length 77 with the real
49,408-token CLIP vocabulary (built offline from open_clip's merge list).
Each tokenizer runs `--repeats` times, interleaved, and the best time counts.
"Tokens" are the non-pad ids produced, start and end tokens included.
Also times our tokenizer with the pure-`tokenizers` route forced, for the
record of why the hybrid exists.

Usage:

    python benchmarks/tokenizer_speed.py [--prompts 10000] [--repeats 5]

Examples:

>>> import subprocess, sys
>>> out = subprocess.run([sys.executable, "benchmarks/tokenizer_speed.py",
...     "--prompts", "200", "--repeats", "1"], capture_output=True, text=True)
>>> "ratio" in out.stdout
True
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "src"), os.path.join(ROOT, "tests")]

from prompt_corpus import prompt_corpus, write_clip_vocabulary  # noqa: E402

from keras_diffusion.models.stable_diffusion_3.clip_tokenizer import (  # noqa: E402
    CLIPTokenizer,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from transformers import CLIPTokenizerFast

    prompts = prompt_corpus(n_generated=args.prompts, seed=7)[-args.prompts :]
    with tempfile.TemporaryDirectory() as folder:
        write_clip_vocabulary(folder)
        ours = CLIPTokenizer(
            os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        )
        ours_rust = CLIPTokenizer(
            os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        )
        ours_rust._use_fast_path = False
        theirs = CLIPTokenizerFast.from_pretrained(folder)

    def run_theirs():
        return theirs(
            prompts, padding="max_length", max_length=77, truncation=True
        ).input_ids

    def run_ours():
        ours._cache.clear()  # no help from earlier repeats
        return ours(prompts)

    runners = {
        "ours": run_ours,
        "ours (tokenizers only)": lambda: ours_rust(prompts),
        "transformers": run_theirs,
    }
    best = dict.fromkeys(runners, float("inf"))
    outputs = {}
    for _ in range(args.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            outputs[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)

    reference = np.asarray(outputs["transformers"])
    for name, ids in outputs.items():
        if not np.array_equal(np.asarray(ids), reference):
            raise AssertionError(f"{name} disagrees with transformers")
    n_tokens = int((reference != ours.pad_token_id).sum()) + len(prompts)
    print(f"{len(prompts)} prompts, {n_tokens} tokens, best of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name:>24}: {n_tokens / seconds:>12,.0f} tokens/s ({seconds:.3f} s)")
    print(f"ratio ours / transformers: {best['transformers'] / best['ours']:.2f}x")
    return best


if __name__ == "__main__":
    main()
