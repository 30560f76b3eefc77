"""Prometheus metrics, CORS and OpenAI's stream shape, against a real ``llama3 serve`` process.

Oracles: ``prometheus_client.parser`` reading /metrics back (values checked against the requests this test
made and /health's counters), the real ``openai`` client, and a browser's CORS preflight as raw HTTP.
"""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from test_server import KEY, running_server

AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://localhost:5173"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--max-seq-len", "256", "--max-batch-size", "2", "--api-key", KEY, "--threads", "1",
            "--log-level", "warning", "--cors-origin", ORIGIN]
    with running_server(args, tmp_path_factory, "metrics") as url:
        yield url


def scrape(server: str) -> dict[str, dict[tuple, float]]:
    response = httpx.get(server + "/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for key, v in samples.get(name, {}).items() if all((k, labels[k]) in key for k in labels))


def test_metrics_count_what_happened(server):
    client = OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
    before = scrape(server)
    for stream in (False, True):
        answer = client.chat.completions.create(model="x", max_tokens=6, temperature=0, stream=stream,
                                                messages=[{"role": "user", "content": "Say hi"}])
        if stream:
            list(answer)
    assert httpx.post(server + "/v1/chat/completions", json={}, timeout=30).status_code == 401  # no key
    after = scrape(server)
    route = "/v1/chat/completions"
    assert total(after, "llama3_requests_total", route=route, status="200") - \
        total(before, "llama3_requests_total", route=route, status="200") == 2
    assert total(after, "llama3_requests_total", route=route, status="401") - \
        total(before, "llama3_requests_total", route=route, status="401") == 1
    # Two sequences, each with a first token and an end; their tokens are in the generated counter.
    assert total(after, "llama3_time_to_first_token_seconds_count") - total(before, "llama3_time_to_first_token_seconds_count") == 2
    assert total(after, "llama3_e2e_sequence_seconds_count") - total(before, "llama3_e2e_sequence_seconds_count") == 2
    generated = total(after, "llama3_generation_tokens_total") - total(before, "llama3_generation_tokens_total")
    per_token = total(after, "llama3_time_per_output_token_seconds_count") - \
        total(before, "llama3_time_per_output_token_seconds_count")
    assert 2 <= generated <= 12 and per_token == generated - 2
    health = httpx.get(server + "/health", timeout=10).json()
    assert total(after, "llama3_prompt_tokens_total") == health["prompt_tokens"]
    assert total(after, "llama3_kv_cache_slots") == 2 and total(after, "llama3_requests_running") == 0
    assert "llama3_prefix_cache_hits_total" in after and "llama3_requests_waiting" in after


def test_metrics_need_the_key(server):
    assert httpx.get(server + "/metrics", timeout=10).status_code == 401
    assert httpx.get(server + "/health", timeout=10).status_code == 200  # load balancers need no key


def test_cors_preflight_and_headers(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    response = httpx.options(server + "/v1/chat/completions", headers=preflight, timeout=10)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    other = httpx.options(server + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"},
                          timeout=10)
    assert "access-control-allow-origin" not in other.headers
    # The real call's answers carry the header too, even a 401, so the page can read the error.
    refused = httpx.get(server + "/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


def test_stream_ends_with_an_empty_delta_and_fingerprint(server):
    client = OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
    chunks = list(client.chat.completions.create(model="x", max_tokens=5, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Count: 1, 2,"}]))
    assert all(c.system_fingerprint and c.system_fingerprint.startswith("fp_") for c in chunks)
    last = chunks[-1].choices[0]
    assert last.finish_reason == "length" and not last.delta.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    whole = client.chat.completions.create(model="x", max_tokens=5, temperature=0,
                                           messages=[{"role": "user", "content": "Count: 1, 2,"}])
    assert whole.system_fingerprint == chunks[0].system_fingerprint
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    legacy = list(client.completions.create(model="x", prompt="1, 2, 3,", max_tokens=4, temperature=0, stream=True))
    assert legacy[-1].choices[0].text == "" and legacy[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in legacy[:-1])
