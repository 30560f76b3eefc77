"""Ollama's API against a real ``llama3 serve`` process, through the real ``ollama`` Python client.

Oracles: the client's own response models (it parses every answer), the same request through the OpenAI
route (same greedy text), JSON-schema validation of ``format`` answers, and Ollama's error shape.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import pytest
from openai import OpenAI

from test_server import KEY, running_server

AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "What is the capital of France? One word."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--max-seq-len", "512", "--max-batch-size", "2", "--api-key", KEY, "--threads", "1",
            "--log-level", "warning", "--model-name", "smollm2"]
    with running_server(args, tmp_path_factory, "ollama") as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server, headers=AUTH, timeout=120)


def test_chat_streaming_and_not_agree_with_the_openai_route(server, client):
    options = {"temperature": 0, "num_predict": 12}
    whole = client.chat(model="smollm2", messages=HI, options=options, stream=False)
    parts = list(client.chat(model="smollm2:latest", messages=HI, options=options, stream=True))
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.role == "assistant"
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].eval_count == whole.eval_count and 1 <= whole.eval_count <= 12
    assert whole.prompt_eval_count > 5 and whole.total_duration > 0
    openai = OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    same = openai.chat.completions.create(model="smollm2", messages=HI, temperature=0, max_tokens=12)
    assert same.choices[0].message.content == whole.message.content


def test_generate_with_context_continues(client):
    first = client.generate(model="smollm2", prompt="Name a fruit.", options={"temperature": 0, "num_predict": 8},
                            stream=False)
    assert first.done and first.response and first.context and len(first.context) > first.prompt_eval_count
    second = client.generate(model="smollm2", prompt="And a vegetable?", context=first.context,
                             options={"temperature": 0, "num_predict": 8}, stream=False)
    assert second.prompt_eval_count > len(first.context)  # the earlier exchange came along
    raw = list(client.generate(model="smollm2", prompt="1, 2, 3,", raw=True, stream=True,
                               options={"temperature": 0, "num_predict": 6}))
    assert raw[-1].done and raw[-1].done_reason == "length" and "".join(r.response for r in raw)


def test_format_schema_and_json(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"]}
    answer = client.chat(model="smollm2", messages=HI, format=schema, options={"temperature": 0.8, "seed": 3})
    jsonschema.validate(json.loads(answer.message.content), schema)
    anything = client.generate(model="smollm2", prompt="A cat as JSON.", format="json", options={"seed": 1})
    assert isinstance(json.loads(anything.response), dict)


def test_listings(client):
    tags = client.list()
    (model,) = tags.models
    assert model.model == "smollm2" and model.size > 50_000_000 and model.details.quantization_level == "Q4_1"
    assert model.details.family == "llama" and model.details.parameter_size.endswith("M")
    shown = client.show("smollm2")
    assert shown.modelinfo["llama.block_count"] == 30 and "completion" in shown.capabilities
    assert client.ps().models[0].model == "smollm2"


def test_errors_are_ollamas(server, client):
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(model="smollm2", messages=HI, options={"num_ctx": 100000})
    assert raised.value.status_code == 400 and "num_ctx" in raised.value.error
    with pytest.raises(ollama.ResponseError) as raised:
        client.show("no-such-model")
    assert raised.value.status_code == 404
    for path, body in (("/api/chat", {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
                       ("/api/generate", {"prompt": "x"}), ("/api/embed", {"model": "m", "input": []})):
        response = httpx.post(server + path, json=body, headers=AUTH, timeout=30)
        assert response.status_code == 400 and isinstance(response.json()["error"], str), response.text
    unauthorised = httpx.get(server + "/api/tags", timeout=10)
    assert unauthorised.status_code == 401 and isinstance(unauthorised.json()["error"], str)
    assert httpx.get(server + "/api/version", headers=AUTH, timeout=10).json()["version"]
