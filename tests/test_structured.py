"""Structured output: grammars enforced while decoding, on the Meta API and on a real server process.

Oracles: a brute-force walk over the whole vocabulary (which tokens can extend the text so far toward a
member of a small finite language), ``jsonschema`` validation of every output, the ``openai`` client's own
``parse()``, and the response_format cases of llama.cpp's server tests, asked of this server.
"""

from __future__ import annotations

import json
import re
from itertools import product

import httpx
import jsonschema
import pytest
import torch
from openai import OpenAI
from pydantic import BaseModel, Field

from llama3 import Grammar, GrammarError, Llama
from llama3.assets import default_model_path, llama3_tokenizer_model
from llama3.constraints.grammar import GrammarConstraint
from llama3.tokenizer import load_tokenizer

from test_server import AUTH, CHAT, client, server  # noqa: F401 - the server fixtures

# -- masks against brute force ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["smollm2", "llama3"])
def any_tokenizer(request):
    return load_tokenizer(default_model_path() if request.param == "smollm2" else llama3_tokenizer_model())


@pytest.fixture(scope="module")
def ordinary_tokens(any_tokenizer) -> list[tuple[int, bytes]]:
    tok = any_tokenizer
    return [(i, tok.token_bytes(i)) for i in range(tok.n_words) if i not in tok.stop_tokens and not tok.is_special(i)]


def brute_force_allowed(tokenizer, tokens, language: set[bytes], text: bytes) -> set[int]:
    """Every ordinary token whose bytes keep ``text`` a prefix of some member; stop tokens iff ``text`` is one."""
    prefixes = {word[:k] for word in language for k in range(len(word) + 1)}
    allowed = {i for i, data in tokens if data and text + data in prefixes}
    if text in language:
        allowed |= set(tokenizer.stop_tokens)
    return allowed


LANGUAGES = {
    "choice": (Grammar.choice(["yes", "no", "not sure", "yes, definitely"]),
               {b"yes", b"no", b"not sure", b"yes, definitely"}),
    "regex": (Grammar.regex(r"[0-9]{1,2}(\.[05])?"),
              {a + b for a in [bytes(str(n), "ascii") for n in range(100)] + [b"0" + bytes(str(n), "ascii") for n in range(10)]
               for b in (b"", b".0", b".5")}),
    "gbnf": (Grammar.gbnf('root ::= ("ab" | "c") ("d" | "ef")'), {a + b for a, b in product([b"ab", b"c"], [b"d", b"ef"])}),
}


@pytest.mark.parametrize("name", list(LANGUAGES))
def test_masks_match_a_brute_force_walk_of_the_vocabulary(any_tokenizer, ordinary_tokens, name):
    grammar, language = LANGUAGES[name]
    tok = any_tokenizer
    # Walk several paths through the language, one token at a time, checking the mask at every step.
    for word in sorted(language)[:: max(1, len(language) // 6)]:
        constraint = GrammarConstraint(grammar, tok)
        ids = tok.encode(word.decode(), bos=False, eos=False)
        text = b""
        for step in range(len(ids) + 1):
            logits = torch.zeros(tok.n_words)
            constraint(ids[:step], logits)
            got = set(torch.nonzero(logits == 0).flatten().tolist())
            expected = brute_force_allowed(tok, ordinary_tokens, language, text)
            nexts = {w[len(text)] for w in language if w.startswith(text) and len(w) > len(text)}
            if text not in language and len(nexts) == 1:
                # The next bytes are forced: llguidance then allows only their canonical tokenization (the
                # tokens a model was trained on), a non-empty subset of what could be spelled.
                assert got and got <= expected, (name, word, step)
            else:
                assert got == expected, (name, word, step)
            if step < len(ids):
                text += tok.token_bytes(ids[step])


def test_unenforceable_schemas_name_the_keyword():
    with pytest.raises(GrammarError, match="contains"):
        Grammar.json_schema({"type": "array", "contains": {"type": "integer"}})
    with pytest.raises(GrammarError, match="hiccup"):
        Grammar.json_schema({"type": "hiccup"})
    with pytest.raises(GrammarError, match="not supported"):
        Grammar.from_response_format({"type": "sound"})
    with pytest.raises(GrammarError, match="undefined_rule"):
        Grammar.gbnf("root ::= undefined_rule")


# -- the Meta API ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> Llama:
    return Llama.build(None, max_seq_len=512, max_batch_size=4, seed=1)

PRODUCT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 60},
        "price": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
    },
    "required": ["name", "price", "tags"],
    "additionalProperties": False,
}


def test_meta_api_json_schema_at_temperature_one(smol):
    dialogs = [[{"role": "user", "content": f"Describe product {i} of a kitchen shop as JSON."}] for i in range(4)]
    fmt = {"type": "json_schema", "json_schema": {"name": "product", "schema": PRODUCT_SCHEMA}}
    for temperature in (0.0, 1.0):
        out = smol.chat_completion(dialogs, temperature=temperature, top_p=1.0, max_gen_len=160, response_format=fmt)
        for result in out:
            jsonschema.validate(json.loads(result["generation"]["content"]), PRODUCT_SCHEMA)


def test_meta_api_regex_and_choice(smol):
    (result,) = smol.text_completion(["The year the Berlin wall fell:"], max_gen_len=8,
                                     response_format=Grammar.regex(r" ?[0-9]{4}"))
    assert re.fullmatch(r" ?[0-9]{4}", result["generation"])
    tokens, _ = smol.generate([smol.tokenizer.encode("Is water wet?", bos=False, eos=False)], max_gen_len=8,
                              temperature=1.0, response_format=Grammar.choice([" yes", " no"]))
    assert smol.tokenizer.decode(tokens[0]) in (" yes", " no")


# -- the server ------------------------------------------------------------------------------------------


class Dimensions(BaseModel):
    width_cm: int
    height_cm: int


class Product(BaseModel):
    name: str = Field(max_length=60)
    price: float
    tags: list[str] = Field(max_length=4)
    size: Dimensions


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_openai_parse_gives_valid_objects_every_time(client, temperature):
    valid = 0
    for i in range(20):
        completion = client.chat.completions.parse(
            model="any", response_format=Product, temperature=temperature, seed=i, max_tokens=200,
            messages=[{"role": "user", "content": f"Invent product number {i} for a hardware store."}],
        )
        message = completion.choices[0].message
        assert isinstance(message.parsed, Product), message.content
        valid += 1
    assert valid == 20


def test_json_object_parses_and_response_format_reaches_completions(client: OpenAI):
    # (Finished answers parse; one cut by max_tokens ends with finish_reason "length", as OpenAI's do.)
    answer = client.chat.completions.create(model="any", max_tokens=200, temperature=0,
                                            response_format={"type": "json_object"},
                                            messages=[{"role": "user", "content": "Give me a JSON object with a cat's name and age."}])
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    text = client.completions.create(model="any", prompt="Numbers:", max_tokens=6, temperature=1.0,
                                     extra_body={"guided_regex": "( [0-9])+"}).choices[0].text
    assert re.fullmatch("( [0-9])+", text), text
    choice = client.completions.create(model="any", prompt="Is the sky blue?", max_tokens=4,
                                       extra_body={"guided_choice": [" yes", " no"]}).choices[0].text
    assert choice in (" yes", " no")


def test_streaming_json_schema_equals_the_whole_answer(client: OpenAI):
    body = dict(model="any", max_tokens=150, temperature=0, messages=[{"role": "user", "content": "A product, as JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PRODUCT_SCHEMA}})
    whole = client.chat.completions.create(**body).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                       if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), PRODUCT_SCHEMA)


# llama.cpp's server tests (tools/server/tests/unit/test_chat_completion.py): response_format, json_schema, grammar.
LLAMA_CPP_CASES = [
    ({"response_format": {"type": "json_object", "schema": {"const": "42"}}}, 6, '"42"'),
    ({"response_format": {"type": "json_object", "schema": {"items": [{"type": "integer"}]}}}, 10, "[ -3000 ]"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"const": "foooooo"}}}}, 10, '"foooooo"'),
    ({"response_format": {"type": "json_object"}}, 10, "(\\{|John)+"),
    ({"response_format": {"type": "sound"}}, 0, None),
    ({"response_format": {"type": "json_object", "schema": 123}}, 0, None),
    ({"response_format": {"type": "json_object", "schema": {"type": 123}}}, 0, None),
    ({"response_format": {"type": "json_object", "schema": {"type": "hiccup"}}}, 0, None),
    ({"json_schema": {"const": "42"}}, 6, '"42"'),
    ({"grammar": 'root ::= "a"{5,5}'}, 6, "a{5,5}"),
]


@pytest.mark.parametrize("fields, max_tokens, pattern", LLAMA_CPP_CASES)
def test_llama_cpp_response_format_cases(server, fields, max_tokens, pattern):
    # Greedy, so the answer is the same on every run (the schemas admit more than the patterns do, e.g. null).
    body = {"max_tokens": max_tokens or 1, "temperature": 0, **fields,
            "messages": [{"role": "system", "content": "You are a coding assistant."},
                         {"role": "user", "content": "Write an example"}]}
    response = httpx.post(server + CHAT, json=body, headers=AUTH, timeout=60)
    if pattern is None:
        assert response.status_code == 400, response.text
        assert "error" in response.json()
    else:
        assert response.status_code == 200, response.text
        assert re.search(pattern, response.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("budget", [24, 48, 96])
def test_output_closes_within_the_token_budget(smol, budget):
    # Greedy SmolLM2 repeats digits inside a string here until any budget runs out; near the end of the budget
    # the constraint steers to the shortest way out, so the object still parses.
    dialog = [{"role": "user", "content": "Answer as JSON: what is the capital of France?"}]
    (result,) = smol.chat_completion([dialog], temperature=0, max_gen_len=budget, response_format={"type": "json_object"})
    content = result["generation"]["content"]
    assert isinstance(json.loads(content), dict), content
    assert len(smol.tokenizer.encode(content, bos=False, eos=False)) <= budget
