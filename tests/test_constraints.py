"""Constrained decoding (llama3.constraints) against brute-force oracles, on synthetic and real vocabularies.

Oracle: for small answer sets, every accepted string is enumerated (itertools.permutations), so the
exact set of allowed next tokens after any text is "tokens t such that text + t is a prefix of an
accepted string", computed by string comparison over the whole vocabulary, independently of the
automaton/trie code under test.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from llama3.constraints import (AutomatonConstraint, CopyAutomaton, Grammar, GrammarConstraint, CopyBiasProcessor,
                                LineLimitProcessor, NumberListAutomaton, token_table)


class ListTokenizer:
    """A toy tokenizer over an explicit vocabulary (greedy longest match encoding)."""

    def __init__(self, vocab: list[str], stop: tuple[str, ...] = ("<eos>", "<eot>")) -> None:
        self.vocab = list(stop) + vocab
        self.stop_tokens = frozenset(range(len(stop)))
        self.n_words = len(self.vocab)

    def token_bytes(self, i: int) -> bytes:
        return self.vocab[i].encode()

    def is_special(self, i: int) -> bool:
        return i in self.stop_tokens

    def encode(self, s: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        out, pos = [], 0
        while pos < len(s):
            best = max((i for i in range(len(self.stop_tokens), self.n_words) if s.startswith(self.vocab[i], pos)),
                       key=lambda i: len(self.vocab[i]))
            out.append(best)
            pos += len(self.vocab[best])
        return out

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


class HFByteTokenizer:
    """Adapter over Hugging Face ``tokenizers`` (byte-level BPE) exposing the TokenizerLike interface."""

    def __init__(self, path: str, stop: tuple[str, ...]) -> None:
        import tokenizers

        self.tok = tokenizers.Tokenizer.from_file(path)
        self.n_words = self.tok.get_vocab_size(with_added_tokens=True)
        self.special = set(self.tok.get_added_tokens_decoder())
        self.stop_tokens = frozenset(self.tok.token_to_id(s) for s in stop)
        # GPT-2's printable stand-ins for raw bytes, inverted.
        printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        codes, n = list(printable), 0
        for b in range(256):
            if b not in printable:
                printable.append(b)
                codes.append(256 + n)
                n += 1
        self.unbyte = {chr(c): b for b, c in zip(printable, codes)}

    def token_bytes(self, i: int) -> bytes:
        return bytes(self.unbyte[ch] for ch in self.tok.id_to_token(i))

    def is_special(self, i: int) -> bool:
        return i in self.special

    def encode(self, s: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def llama3_tok() -> HFByteTokenizer:
    from llama3.assets import llama3_tokenizer_json

    return HFByteTokenizer(str(llama3_tokenizer_json()), stop=("<|end_of_text|>", "<|eot_id|>"))


@pytest.fixture(scope="module")
def smol_tok():
    tokenizer_mod = pytest.importorskip("llama3.tokenizer")
    from llama3.assets import default_model_path

    return tokenizer_mod.load_tokenizer(default_model_path())


# Both styles of digit handling: single digits and multi-digit tokens, separators alone and merged.
TOY = ListTokenizer(["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "12", "15", "123", ",", " ", ", ",
                     " ,", ",,", "  ", "a", "ab", "\n", "x\n", "1,", "5, 1"])


def accepted_strings(allowed: list[int], count: int) -> set[str]:
    """Every accepted answer: ordered picks of distinct numbers, each separator "," or ", "."""
    out = set()
    for p in itertools.permutations(allowed, count):
        for seps in itertools.product([",", ", "], repeat=count - 1):
            out.add("".join(str(n) + s for n, s in zip(p, seps + ("",))))
    return out


def mixed_ok(s: str, allowed: list[int], count: int) -> bool:
    """Independent definition: numbers split on ',' with at most one space after each comma."""
    parts = s.split(",")
    if len(parts) != count:
        return False
    nums = []
    for j, p in enumerate(parts):
        if j > 0 and p.startswith(" "):
            p = p[1:]
        if not p.isdigit() or str(int(p)) != p:
            return False
        nums.append(int(p))
    return len(set(nums)) == count and set(nums) <= set(allowed)


def run_automaton(automaton, text: str) -> bool:
    state = automaton.start()
    for b in text.encode():
        state = automaton.step(state, b)
        if state is None:
            return False
    return automaton.accepts(state)


@pytest.mark.parametrize("text,ok", [
    ("6,9,15", True), ("6, 9, 15", True), ("15,1, 10", True), ("6,9", False), ("6,6,9", False),
    ("6,9,15,", False), ("06,9,15", False), ("16,1,2", False), ("6 ,9,15", False), ("6,  9,15", False),
    (" 6,9,15", False), ("6,9,15 ", False), ("0,1,2", False), ("", False),
])
def test_number_list_automaton_cases(text, ok):
    assert run_automaton(NumberListAutomaton(range(1, 16), 3), text) is ok


def test_number_list_automaton_matches_enumeration():
    allowed, count = [1, 2, 3, 10, 12], 3
    automaton = NumberListAutomaton(allowed, count)
    # Every string over the alphabet up to 7 chars: accepted exactly when the independent rule says so.
    for n in range(1, 8):
        for chars in itertools.product("0123 ,", repeat=n):
            s = "".join(chars)
            assert run_automaton(automaton, s) == mixed_ok(s, allowed, count), s
    assert automaton.max_len == max(len(s) for s in accepted_strings(allowed, count))


def test_permutation():
    perm = NumberListAutomaton([1, 2, 3, 4, 5])  # count None: each once
    assert run_automaton(perm, "2,1,4,5,3") and run_automaton(perm, "5, 4, 3, 2, 1")
    assert not run_automaton(perm, "2,1,4,5") and not run_automaton(perm, "2,1,4,5,5")
    with pytest.raises(ValueError):
        NumberListAutomaton([1, 2], 3)


def oracle_allowed(tok, text: str, accepted: set[str]) -> set[int]:
    prefixes = {a[:k].encode() for a in accepted for k in range(len(a) + 1)}
    ids = {i for i in range(tok.n_words) if not tok.is_special(i) and tok.token_bytes(i)
           and text.encode() + tok.token_bytes(i) in prefixes}
    if text in accepted:
        ids |= set(tok.stop_tokens)
    return ids


def allowed_after(tok, automaton, text: str) -> set[int]:
    proc = AutomatonConstraint(tok, automaton)
    generated = tok.encode(text, bos=False, eos=False) if text else []
    logits = torch.zeros(tok.n_words)
    out = proc(generated, logits)
    return set(torch.nonzero(torch.isfinite(out)).flatten().tolist())


@pytest.mark.parametrize("text", ["", "1", "12", "12,", "12, ", "12,3", "3,10", "3, 10,", "3,10,2", "3,10,12"])
def test_allowed_tokens_equal_oracle_toy(text):
    allowed, count = [1, 2, 3, 10, 12], 3
    accepted = accepted_strings(allowed, count)
    assert allowed_after(TOY, NumberListAutomaton(allowed, count), text) == oracle_allowed(TOY, text, accepted)


@pytest.mark.parametrize("text", ["", "1,", "12, 9", "7, 12, 9"])
def test_allowed_tokens_equal_oracle_llama3(llama3_tok, text):
    allowed, count = list(range(1, 13)), 3
    accepted = accepted_strings(allowed, count)
    got = allowed_after(llama3_tok, NumberListAutomaton(allowed, count), text)
    assert got == oracle_allowed(llama3_tok, text, accepted)
    if text == "":  # Llama 3 has "10", "11", "12" as single tokens: they must be offered whole
        assert {llama3_tok.encode(s)[0] for s in ("10", "11", "12")} <= got


def test_choice_allows_only_offered_digits_then_stop(llama3_tok):
    """ShopBench's multiple-choice constraint (a llguidance choice grammar): one offered digit, then a stop."""
    proc = GrammarConstraint(Grammar.choice(["0", "1", "2", "3"]), llama3_tok)
    first = set(torch.nonzero(torch.isfinite(proc([], torch.zeros(llama3_tok.n_words)))).flatten().tolist())
    assert first == {llama3_tok.encode(str(d))[0] for d in range(4)}
    two = llama3_tok.encode("2")
    after = set(torch.nonzero(torch.isfinite(proc(two, torch.zeros(llama3_tok.n_words)))).flatten().tolist())
    assert after == set(llama3_tok.stop_tokens)
    # With the budget of one digit and the stop token, every option still fits: the model's choice stands
    # (closing near the budget must not narrow the choice to one option).
    for digit in "0123":
        logits = torch.zeros(llama3_tok.n_words)
        logits[llama3_tok.encode(digit)[0]] = 5.0
        tight = GrammarConstraint(Grammar.choice(["0", "1", "2", "3"]), llama3_tok)([], logits, 2)
        assert llama3_tok.decode([int(tight.argmax())]) == digit
        assert int(torch.isfinite(tight).sum()) == 4


def decode_with(tok, procs, rng: torch.Generator, max_steps: int, adversary: set[int] | None = None) -> str:
    """Greedy decoding from random logits (optionally boosting forbidden tokens) through ``procs``."""
    generated: list[int] = []
    for _ in range(max_steps):
        logits = torch.randn(tok.n_words, generator=rng)
        if adversary:
            logits[list(adversary)] += 50.0
        for p in procs:
            logits = p(generated, logits)
        t = int(torch.argmax(logits))
        assert torch.isfinite(logits[t])
        if t in tok.stop_tokens:
            return tok.decode(generated)
        generated.append(t)
    raise AssertionError(f"no stop within {max_steps} tokens: {tok.decode(generated)!r}")


@pytest.mark.parametrize("vocab", ["toy", "llama3", "smollm2"])
def test_random_decoding_always_valid(vocab, request):
    tok = {"toy": lambda: TOY, "llama3": lambda: request.getfixturevalue("llama3_tok"),
           "smollm2": lambda: request.getfixturevalue("smol_tok")}[vocab]()
    rng = torch.Generator().manual_seed(0)
    letters = set(tok.encode("ab\nab", bos=False, eos=False))  # tokens the constraint must refuse
    for trial in range(12):
        allowed = random.Random(trial).sample(range(1, 21), k=random.Random(trial).randint(3, 12))
        count = min(3, len(allowed))
        proc = AutomatonConstraint(tok, NumberListAutomaton(allowed, count))
        text = decode_with(tok, [proc], rng, proc.max_tokens, adversary=letters if trial % 2 else None)
        assert mixed_ok(text, allowed, count), (allowed, text)
        perm = AutomatonConstraint(tok, NumberListAutomaton(range(1, 6)))
        text = decode_with(tok, [perm], rng, perm.max_tokens)
        assert mixed_ok(text, [1, 2, 3, 4, 5], 5), text


def test_token_table_cached_and_specials_excluded(llama3_tok):
    table = token_table(llama3_tok)
    assert token_table(llama3_tok) is table
    assert table.token_bytes[128009] == b"" and table.token_bytes[11] == b","  # <|eot_id|> never text
    assert table.ids_of(b", ") == [i for i in range(128000) if llama3_tok.token_bytes(i) == b", "]


def test_copy_bias_boosts_query_tokens_only(llama3_tok):
    proc = CopyBiasProcessor(llama3_tok, "chocolate buttons cadbury xmas", bonus=3.0)
    logits = torch.zeros(llama3_tok.n_words)
    out = proc([], logits.clone())
    boosted = set(torch.nonzero(out == 3.0).flatten().tolist())
    for word in ("chocolate", " cadbury", "xmas"):
        assert set(llama3_tok.encode(word)) <= boosted
    assert set(llama3_tok.stop_tokens) <= boosted and llama3_tok.encode(",")[0] in boosted
    assert llama3_tok.encode(" laptop")[0] not in boosted
    assert set(torch.unique(out).tolist()) == {0.0, 3.0}


def test_line_limit_forces_stop_after_first_line():
    proc = LineLimitProcessor(TOY, max_lines=1)
    logits = torch.arange(TOY.n_words, dtype=torch.float32)
    assert torch.equal(proc(TOY.encode("\n"), logits.clone()), logits)  # a leading newline is not a line
    assert torch.equal(proc(TOY.encode("ab"), logits.clone()), logits)
    out = proc(TOY.encode("abx\n"), logits.clone())
    assert set(torch.nonzero(torch.isfinite(out)).flatten().tolist()) == set(TOY.stop_tokens)


COPY_SOURCE = "tablette asus, 3m vinyl!"
# Hand-listed: word-start to word-end spans that cross no comma.
COPY_PHRASES = ["tablette", "tablette asus", "asus", "3m", "3m vinyl", "vinyl"]


def copy_accepted(max_items: int) -> set[str]:
    out = set(COPY_PHRASES) if max_items >= 1 else set()
    if max_items >= 2:
        out |= {a + sep + b for a in COPY_PHRASES for b in COPY_PHRASES for sep in (",", ", ")}
    return out


def test_copy_automaton_matches_enumeration():
    automaton = CopyAutomaton(COPY_SOURCE, max_items=2)
    accepted = copy_accepted(2)
    for s in accepted:
        assert run_automaton(automaton, s), s
    for s in ["tab", "tablette as", "asus,", "3m vinyl!", "vinyl!", " asus", "asus, 3m, vinyl", "blette",
              "tablette  asus", "asus,,3m", ""]:
        assert not run_automaton(automaton, s), s
    assert not run_automaton(CopyAutomaton(COPY_SOURCE, 1), "asus,3m")
    assert automaton.max_len == max(len(s) for s in accepted)  # "tablette asus, tablette asus"
    with pytest.raises(ValueError):
        CopyAutomaton("!!, ?", 1)


@pytest.mark.parametrize("text", ["", "tab", "tablette", "tablette,", "tablette, 3", "asus,3m vin"])
def test_copy_allowed_tokens_equal_oracle_llama3(llama3_tok, text):
    got = allowed_after(llama3_tok, CopyAutomaton(COPY_SOURCE, 2), text)
    assert got == oracle_allowed(llama3_tok, text, copy_accepted(2))
    assert got  # never a dead end


def test_copy_random_decoding_yields_source_phrases(llama3_tok):
    rng = torch.Generator().manual_seed(3)
    source = "chocolate buttons cadbury xmas, Grüße aus Köln"
    phrases = {source[i:j] for i in range(len(source)) for j in range(i + 1, len(source) + 1)}
    for _ in range(8):
        proc = AutomatonConstraint(llama3_tok, CopyAutomaton(source, 3))
        text = decode_with(llama3_tok, [proc], rng, proc.max_tokens)
        parts = [p[1:] if k and p.startswith(" ") else p for k, p in enumerate(text.split(","))]
        assert 1 <= len(parts) <= 3 and all(p in phrases and p.strip() == p for p in parts), text


def test_chat_and_text_completion_accept_constraints():
    """The processors plug into Llama's text-level API (per-row lists), on the real default model."""
    generation = pytest.importorskip("llama3.generation")
    llm = generation.Llama.build(max_seq_len=256, max_batch_size=2)
    source = "navy blue jeans, red cotton shirt"  # phrases of several tokens each
    dialogs = [[{"role": "user", "content": "Name a piece of clothing."}]] * 2
    procs = [[AutomatonConstraint(llm.tokenizer, CopyAutomaton(source, 1))],
             [AutomatonConstraint(llm.tokenizer, NumberListAutomaton(range(1, 13), 3))]]
    out = llm.chat_completion(dialogs, temperature=0.8, max_gen_len=20, logits_processors=procs, seed=5)
    answer = out[0]["generation"]["content"]
    assert answer and answer in source and "," not in answer
    assert mixed_ok(out[1]["generation"]["content"], list(range(1, 13)), 3)
    text = llm.text_completion(["My favourite numbers are"], temperature=0, max_gen_len=12,
                               logits_processors=[[AutomatonConstraint(llm.tokenizer, NumberListAutomaton([7, 8, 9], 2))]])
    assert mixed_ok(text[0]["generation"], [7, 8, 9], 2)
