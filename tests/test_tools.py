"""Tool calling: Llama 3.1's prompt format, chat templates with ``tools=``, calls read back, and the OpenAI
tool-call protocol on a real server process with the default model.

Oracles: Meta's documented Llama 3.1 prompt written out as text and encoded independently (tiktoken with the
special tokens allowed), transformers' ``apply_chat_template(tools=...)``, ``jsonschema`` for call arguments,
and the ``openai`` client's own parsing of responses and stream deltas.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from llama3 import Llama
from llama3.assets import llama3_tokenizer_model
from llama3.tokenizer import load_tokenizer
from llama3.tools import ToolChoice, ToolError, parse_tool_choice, parse_tools, read_tool_calls

from test_server import AUTH, CHAT, client, server  # noqa: F401 - the server fixtures

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def test_llama31_prompt_is_metas_documented_format():
    tok = load_tokenizer(llama3_tokenizer_model())
    tools = parse_tools([WEATHER])
    dialog = [{"role": "system", "content": "You are a helpful assistant."}, *ASK,
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 18}'}]
    definition = json.dumps(WEATHER, indent=4)
    documented = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper arguments "
        "that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        "Do not use variables.\n\n" + definition + "\n\nWhat's the weather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 18}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.encode_dialog_prompt(dialog, tools=tools)
    assert ids == tok.encode(documented, bos=False, eos=False, allowed_special="all")
    # Pinned: the system turn's opening, and ipython's header.
    assert ids[:6] == [128000, 128006, 9125, 128007, 271, 13013]
    assert tok.encode("ipython", bos=False, eos=False) == [23799, 4690]
    assert 128008 in tok.stop_tokens  # <|eom_id|> ends a Llama 3.1 turn that awaits a tool result


def test_hf_template_gets_tools_as_transformers_gives_them(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from llama3.assets import llama3_tokenizer_json

    template = (
        "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nTools:\n{% for t in tools %}"
        "{{ t.function.name }}: {{ t.function.description }} {{ t.function.parameters | tojson }}\n{% endfor %}"
        "<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}({{ m.tool_calls[0].function.arguments | tojson }})"
        "{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    (tmp_path / "tokenizer.json").write_bytes(llama3_tokenizer_json().read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<|begin_of_text|>",
                                                                 "eos_token": "<|eot_id|>"}))
    ours = load_tokenizer(tmp_path)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    dialog = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C"}]
    expected = theirs.apply_chat_template(dialog, tools=[WEATHER, ADD], chat_template=template,
                                          add_generation_prompt=True, tokenize=True)
    if hasattr(expected, "keys"):  # a BatchEncoding in newer transformers
        expected = expected["input_ids"]
    assert ours.encode_dialog_prompt(dialog, tools=parse_tools([WEATHER, ADD])) == list(expected)


def test_reading_calls_and_validating_tools():
    tools = parse_tools([WEATHER, ADD])
    calls = read_tool_calls('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                            '{"name": "get_weather", "arguments": {"city": "Oslo"}}', tools)
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]
    assert read_tool_calls("It is sunny.", tools) is None
    assert read_tool_calls('{"name": "unknown", "parameters": {}}', tools) is None
    assert read_tool_calls('{"name": "add", "parameters": {"a": 1}', tools) is None  # cut short: not a call
    two = '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "ad'
    assert len(read_tool_calls(two, tools)) == 2  # a third call cut by max_tokens is dropped
    assert parse_tool_choice({"type": "function", "function": {"name": "add"}}, tools) == ToolChoice("function", "add")
    for bad in ([{"type": "retrieval"}], [{"type": "function", "function": {"name": "a b"}}], [WEATHER, WEATHER]):
        with pytest.raises(ToolError):
            parse_tools(bad)
    with pytest.raises(ToolError, match="not among the tools"):
        parse_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)


@pytest.fixture(scope="module")
def smol() -> Llama:
    return Llama.build(None, max_seq_len=1024, max_batch_size=4, seed=1)


def test_meta_api_tool_round_trip(smol):
    (first,) = smol.chat_completion([ASK], temperature=0, max_gen_len=60, tools=[WEATHER], tool_choice="required")
    (call,) = first["generation"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(call["function"]["arguments"], WEATHER["function"]["parameters"])
    dialog = [*ASK, first["generation"], {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"}]
    (final,) = smol.chat_completion([dialog], temperature=0, max_gen_len=40, tools=[WEATHER], tool_choice="none")
    assert "tool_calls" not in final["generation"] and final["generation"]["content"]


@pytest.mark.parametrize("stream", [False, True])
def test_server_tool_round_trip(client, stream):
    def ask(messages, choice, **extra):
        return client.chat.completions.create(model="any", messages=messages, tools=[WEATHER, ADD], tool_choice=choice,
                                              temperature=0, max_tokens=60, stream=stream, **extra)

    if stream:
        chunks = [c for c in ask(ASK, "required") if c.choices]
        finish = chunks[-1].choices[0].finish_reason
        deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert len(deltas) >= 1 and deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function"
        name, arguments, call_id = deltas[0].function.name, deltas[0].function.arguments, deltas[0].id
    else:
        choice = ask(ASK, "required").choices[0]
        finish, message = choice.finish_reason, choice.message
        assert message.content is None
        name, arguments, call_id = message.tool_calls[0].function.name, message.tool_calls[0].function.arguments, message.tool_calls[0].id
    assert finish == "tool_calls" and name in ("get_weather", "add")
    schema = (WEATHER if name == "get_weather" else ADD)["function"]["parameters"]
    jsonschema.validate(json.loads(arguments), schema)
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "18 C and sunny"}]
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in ask(history, "none") if c.choices)
    else:
        final = ask(history, "none").choices[0]
        assert final.finish_reason in ("stop", "length") and final.message.tool_calls is None
        text = final.message.content
    assert text


def test_server_named_tool_choice_always_calls_it(client):
    for seed in range(4):
        choice = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": f"Add {seed} and {seed + 3}."}], tools=[WEATHER, ADD],
            tool_choice={"type": "function", "function": {"name": "add"}}, temperature=1.0, seed=seed, max_tokens=60,
        ).choices[0]
        assert choice.message.tool_calls, (choice.finish_reason, choice.message.content)
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.function.name == "add"
            jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_server_bad_tool_requests_are_400s(server, body, param):
    response = httpx.post(server + CHAT, json={"messages": ASK, "max_tokens": 4, **body}, headers=AUTH, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_server_rejects_unparseable_call_arguments_in_history(server):
    messages = [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]
    response = httpx.post(server + CHAT, json={"messages": messages, "max_tokens": 4}, headers=AUTH, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"
