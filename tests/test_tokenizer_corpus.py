"""The text corpus the tokenizer parity tests share (``corpus()``, ``long_text()``), and a check that it is varied.

Hand-written samples cover many scripts, emoji sequences, code, numbers, whitespace runs and the
control-token strings of several model families; seeded random strings mix all of those classes
character by character, which is where pre-tokenizer differences show up.
"""

from __future__ import annotations

import random
import unicodedata

SAMPLES = [
    "Hello, world! This is a simple English sentence.",
    "I'M SURE THEY'LL COME, DON'T YOU THINK? We've, I'd, she's, it'S, you'Re",
    "Le cœur a ses raisons que la raison ne connaît point. Ça va? Où est l'hôtel?",
    "Größenwahnsinnige Straßenbahnhaltestelle, übermäßig ärgerlich.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "مرحبا بالعالم، كيف حالك اليوم؟ ١٢٣٤٥٦",
    "שלום עולם, מה שלומך?",
    "नमस्ते दुनिया, आप कैसे हैं? १२३४",
    "你好，世界！我今天很高兴。北京是中国的首都。",
    "こんにちは世界。カタカナとひらがな、漢字を混ぜます。",
    "안녕하세요 세계! 반갑습니다.",
    "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "Xin chào thế giới, tiếng Việt có dấu.",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ 🫠 ✨🚀",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    '{"key": [1, 2.5, -3e10, null, true], "nested": {"a": "b"}}',
    '<html><body><div class="x">Text &amp; more</div></body></html>',
    "Numbers: 0 1 12 123 1234 12345 123456 3.14159 2,718 -42 1e-9 0x1F 1_000_000",
    "Phone: +1 (555) 123-4567, date 2024-01-31T12:34:56Z, version v1.2.3",
    "     leading spaces and trailing spaces     ",
    "\n\n\nnewlines\n\n\n\nmore\r\n\r\nwindows\rmac\n",
    "tabs\t\t\tand\t \t mixed   \n  \t whitespace",
    "unicode spaces:\u00a0\u2003\u3000\u2009end\u200b\u200dzero",
    "combining: e\u0301 a\u0308 n\u0303 \u1e9b\u0323",
    "control chars: \x00\x01\x07\x1b[31mred\x1b[0m\x7f",
    "special text <|begin_of_text|> <|eot_id|> <|start_header_id|> <|im_start|> <|im_end|> <|endoftext|> </s> <s>",
    "a" * 1000,
    " " * 1000 + "x",
    "\n" * 500,
    "!!!???...---___***~~~```'''\"\"\"",
    "URL: https://example.com/path?query=1&b=2#frag mail@example.org",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2, ∫₀^∞ e^{-x²} dx = √π/2, α≤β≥γ≠δ",
    "    1\n    2\n  3 4  5\t6\n\t7",
    "x 1 x  22 x   333 x\n4444 \n 55555",
]

POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r  ",
    "'\"!?.,;:-_()[]{}<>/\\|@#$%^&*+=~`",
    "éàüßçñøåæœ",
    "абвгдежзийклмнопрстуфхцчшщъыьэюя",
    "的一是不了人我在有他这为之大来以个中上们",
    "😀👍🏽🇫🇷❤️✨🚀",
    "αβγδεζηθ",
    "\u00a0\u3000\u2003\u200b",
    "ﬁﬂ№™Ⅻ½²³",
    "'s't're've'm'll'd",
]


def corpus(n_random: int = 300, seed: int = 1234) -> list[str]:
    """The hand-written samples plus ``n_random`` seeded random mixtures (1-200 chars each)."""
    rng = random.Random(seed)
    docs = list(SAMPLES)
    for _ in range(n_random):
        n = rng.randint(1, 200)
        docs.append("".join(rng.choice(rng.choice(POOLS)) for _ in range(n)))
    return docs


def long_text(n_chars: int = 500_000, seed: int = 0) -> str:
    """``n_chars`` characters of corpus documents joined by spaces (no run of (non-)whitespace near 25,000)."""
    rng = random.Random(seed)
    docs = corpus()
    parts, total = [], 0
    while total < n_chars:
        doc = rng.choice(docs)
        parts.append(doc)
        total += len(doc) + 1
    return " ".join(parts)[:n_chars]


def test_corpus_is_varied():
    docs = corpus()
    text = "".join(docs)
    categories = {unicodedata.category(c)[0] for c in text}
    assert {"L", "N", "P", "S", "Z", "M", "C"} <= categories  # letters, numbers, punctuation, symbols, marks...
    scripts = {unicodedata.name(c, "?").split()[0] for c in text if c.isalpha()}
    assert {"LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "DEVANAGARI", "CJK", "HIRAGANA", "HANGUL", "THAI"} <= scripts
    assert len(docs) == len(SAMPLES) + 300 and len(set(docs)) == len(docs)
    assert len(long_text()) == 500_000
