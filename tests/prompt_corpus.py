"""Deterministic test data for tokenizer parity tests.

`write_clip_vocabulary(folder)` builds the real CLIP vocabulary offline from
open_clip's merge list.

`prompt_corpus()` returns the same list on every call and every machine:
a fixed set of hand-written edge cases (empty strings, whitespace of every
kind, punctuation runs, contractions, numbers, accents in composed and
decomposed form, emoji with joiners and modifiers, CJK and other scripts,
HTML entities, mojibake, literal special-token text, prompts far over 77
tokens) followed by prompts generated from templates with a seeded
`random.Random`.

Examples:

>>> from prompt_corpus import prompt_corpus
>>> corpus = prompt_corpus()
>>> len(corpus) >= 500
True
>>> corpus == prompt_corpus()
True
"""

import gzip
import json
import os
import random

EDGE_CASES = [
    # Empty and whitespace-only.
    "",
    " ",
    "   \t\n  ",
    "\r\n",
    "\u00a0",
    "\u3000\u2003",
    # Punctuation runs and symbols.
    "!!!",
    "!!!!!!!!!!!!!!!!!!!!",
    "???!!!...",
    "a...b",
    "wow!!! so cool???",
    "--- *** ___ ~~~",
    "#hashtag @user $100 50% a&b",
    "http://example.com/path?q=1&r=2#frag",
    "(parentheses) [brackets] {braces} <angles>",
    "a/b\\c|d",
    "C++ and C# and F#",
    "✓ ✗ ★ ☆ ♥ ♦ → ← ↑ ↓ ∞ ≈ ≠ ≤ ≥",
    "∑∫√π x² y³ ½ ¾ Ⅻ ① ②",
    # Numbers.
    "1234567890",
    "3.14159265358979",
    "1,000,000 and 1.000.000",
    "the 1st, 2nd, 3rd and 4th place",
    "x2 v1.5 sd3.5 4k 8K 1080p",
    "year 2024-01-31 at 12:30:45",
    # Contractions and apostrophes.
    "don't can't won't it's we're I've they'll he'd I'm",
    "DON'T CAN'T IT'S WE'RE I'VE THEY'LL HE'D I'M",
    "rock'n'roll o'clock y'all",
    "'s 't 're 've 'm 'll 'd",
    "''s '''t 'x' ' '",
    "the cat's toy and the dogs' toys",
    # Case.
    "A PHOTO OF A CAT",
    "a PhOtO oF a CaT",
    "CamelCaseWordsAndALLCAPS",
    # Accents, composed and decomposed.
    "café naïve Ångström crème brûlée façade",
    "cafe\u0301 nai\u0308ve A\u030angstro\u0308m",
    "CAFÉ NAÏVE",
    "São Paulo, Zürich, Kraków, Reykjavík",
    "\u0301\u0308 lone combining marks",
    # Case mappings that differ between libraries.
    "ΟΔΟΣ ΣΟΦΙΑΣ",
    "İstanbul ISTANBUL",
    "STRASSE straße ẞ",
    # Emoji.
    "🐱",
    "a cat 🐱 and a dog 🐶 playing",
    "👨\u200d👩\u200d👧\u200d👦 family",
    "🏳️\u200d🌈 flag 🇫🇷 🇯🇵",
    "thumbs up 👍🏽👍🏿",
    "🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥",
    # CJK and other scripts.
    "一只可爱的猫",
    "猫の写真、高品質",
    "고양이 사진",
    "カタカナとひらがな",
    "แมวน่ารัก",
    "قطة جميلة",
    "חתול יפה",
    "बिल्ली की तस्वीर",
    "Кошка на диване",
    "γάτα στον καναπέ",
    "mixed 中文 English 日本語 한국어",
    # Whitespace variants.
    "tab\tseparated\twords",
    "new\nline\r\nand\rcarriage",
    "   leading and trailing   ",
    "many     spaces     between",
    "nbsp\u00a0between",
    "ideographic\u3000space",
    "em\u2003space thin\u2009space",
    "zero\u200bwidth\u200cnon\u200djoiner",
    "line\u2028separator\u2029paragraph",
    "next\u0085line",
    "byte\ufefforder",
    "mongolian\u180evowel",
    # Control characters.
    "bell\x07char",
    "nul\x00char",
    "unit\x1fseparator",
    # HTML entities and markup.
    "fish &amp; chips",
    "&lt;3 &gt; &quot;quoted&quot; &#39;single&#39;",
    "double &amp;amp; escaped",
    "<b>bold</b> <i>italic</i>",
    # Quotes, ligatures, full width, mojibake.
    "\u201ccurly\u201d \u2018quotes\u2019",
    "\ufb01sh \ufb02ower",
    "\uff21\uff22\uff23\uff11\uff12\uff13 full width",
    "cafÃ© mojibake",
    # Literal special-token text.
    "<|startoftext|>",
    "a <|endoftext|> b",
    "<|ENDOFTEXT|>",
    "<start_of_text> <end_of_text>",
    # Long single words.
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "abc123def456ghi",
]

_SUBJECTS = [
    "cat",
    "dog",
    "astronaut",
    "castle",
    "robot",
    "dragon",
    "city skyline",
    "bowl of ramen",
    "old man",
    "mountain lake",
    "sports car",
    "forest",
    "lighthouse",
    "samurai",
    "teapot",
    "owl",
    "café",
    "garçon",
    "猫",
    "龙",
    "さくら",
    "Ёжик",
    "🦊",
    "🍜",
    "piñata",
    "jalapeño",
]
_ADJECTIVES = [
    "a cute",
    "an ancient",
    "a futuristic",
    "a tiny",
    "a giant",
    "a glowing",
    "a rusty",
    "an ethereal",
    "a neon",
    "a minimalist",
    "a hyper-detailed",
    "a low-poly",
    "a watercolor",
    "an über-cool",
    "a señor's",
]
_PLACES = [
    "on the moon",
    "in Tokyo at night",
    "under the sea",
    "in a cyberpunk alley",
    "on a snowy peak",
    "in a Victorian library",
    "at the beach",
    "in space",
    "in München",
    "near Montréal",
    "in 北京",
    "in Αθήνα",
]
_STYLES = [
    "oil painting",
    "trending on artstation",
    "8k, ultra detailed",
    "by greg rutkowski",
    "studio ghibli style",
    "cinematic lighting",
    "35mm photo, f/1.8",
    "unreal engine 5",
    "isometric",
    "pixel art",
    "((masterpiece)), best quality",
    "[[low quality]]",
    "HDR!!!",
    "4K UHD",
    "octane render",
    "award-winning",
]
_JUNK = [
    "!!!",
    "...",
    "???",
    " ,, ",
    " -- ",
    "\t",
    "\n",
    "  ",
    "🔥",
    "✨",
    "&amp;",
    "’",
    "'s",
    "😀😀",
    "#1",
    "1/2",
    "½",
    "×",
    "—",
    "…",
    "\u00a0",
    "~~",
]


def _long_prompt(rng, n_words):
    words = []
    for _ in range(n_words):
        pick = rng.random()
        if pick < 0.5:
            words.append(rng.choice(_SUBJECTS))
        elif pick < 0.8:
            words.append(rng.choice(_STYLES))
        else:
            words.append(rng.choice(_JUNK))
    return ", ".join(words)


def _template_prompt(rng):
    parts = [rng.choice(_ADJECTIVES), rng.choice(_SUBJECTS), rng.choice(_PLACES)]
    parts.append(", ".join(rng.sample(_STYLES, rng.randint(0, 4))))
    text = " ".join(p for p in parts if p)
    # Random mutations: case changes, junk insertions, whitespace noise.
    if rng.random() < 0.25:
        text = text.upper()
    elif rng.random() < 0.15:
        text = text.title()
    for _ in range(rng.randint(0, 3)):
        pos = rng.randint(0, len(text))
        text = text[:pos] + rng.choice(_JUNK) + text[pos:]
    if rng.random() < 0.2:
        text = "  " + text.replace(" ", "   ") + "\n"
    if rng.random() < 0.1:
        text += " " + str(rng.randint(0, 10**9))
    return text


def prompt_corpus(n_generated=520, seed=1234):
    """Return the edge cases plus `n_generated` seeded random prompts."""
    rng = random.Random(seed)
    prompts = list(EDGE_CASES)
    # Prompts around and far over CLIP's 77-token window.
    for n_words in (20, 25, 30, 40, 60, 100, 200):
        prompts.append(_long_prompt(rng, n_words))
    prompts.append(" ".join(["word"] * 74))  # 74 + 2 specials = 76 tokens
    prompts.append(" ".join(["word"] * 75))  # exactly 77
    prompts.append(" ".join(["word"] * 76))  # one over
    prompts.append(" ".join(["word"] * 300))  # far over T5's 256 as well
    for _ in range(n_generated):
        prompts.append(_template_prompt(rng))
    return prompts


def open_clip_bpe_path():
    """Path of open_clip's `bpe_simple_vocab_16e6.txt.gz`, or None."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


def write_clip_vocabulary(folder, bpe_path=None):
    """Write OpenAI CLIP's 49,408-token `vocab.json` and `merges.txt`.

    Built offline from open_clip's merge list the way open_clip builds its
    vocabulary: the 256 byte symbols, the same with `</w>`, one token per
    merge, then `<|startoftext|>` and `<|endoftext|>` (ids 49406, 49407).
    """
    bpe_path = bpe_path or open_clip_bpe_path()
    if bpe_path is None:
        raise FileNotFoundError("open_clip's bpe_simple_vocab_16e6.txt.gz not found")
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in kept]
    symbols = [chr(b) for b in kept] + [chr(256 + i) for i in range(len(moved))]
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder
