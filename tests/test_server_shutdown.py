"""Graceful shutdown of a real ``llama3 serve`` process: SIGTERM stops new work, lets running sequences finish
within ``--shutdown-grace``, then ends the rest with an error event and ``[DONE]``; nothing is cut mid-stream."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_server import CHAT, FRANCE, NEVER_STOP, launch


def start_server(tmp_path: Path, grace: float) -> tuple[subprocess.Popen, str, Path]:
    log_path = tmp_path / f"server-{grace}.log"
    args = ["--max-seq-len", "512", "--threads", "1", "--max-batch-size", "2", "--shutdown-grace", str(grace),
            "--log-level", "warning"]
    proc, url = launch(args, log_path, timeout=120)
    return proc, url, log_path


def stream_events(url: str, max_tokens: int, events: list, started: threading.Event) -> None:
    """Collect a streamed chat's SSE payloads; ``started`` is set at the first content chunk."""
    body = {"messages": FRANCE, "max_tokens": max_tokens, "temperature": 0, "stream": True, "logit_bias": NEVER_STOP}
    with httpx.stream("POST", url + CHAT, json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) > 2:
                    started.set()
    started.set()


def terminate_during_stream(url: str, proc: subprocess.Popen, max_tokens: int) -> tuple[list, float]:
    events: list[str] = []
    started = threading.Event()
    reader = threading.Thread(target=stream_events, args=(url, max_tokens, events, started))
    reader.start()
    assert started.wait(60)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.HTTPError):  # the listening socket is closed: new work is refused
        httpx.post(url + CHAT, json={"messages": FRANCE, "max_tokens": 2}, timeout=5)
    reader.join(60)
    proc.wait(60)
    return events, time.monotonic() - sent


def test_running_streams_finish_within_the_grace_period(tmp_path):
    proc, url, log = start_server(tmp_path, grace=60)
    try:
        events, _ = terminate_during_stream(url, proc, max_tokens=60)
    finally:
        proc.kill()
    assert events[-1] == "[DONE]", events[-3:]
    payloads = [json.loads(e) for e in events[:-1]]
    assert not any("error" in p for p in payloads), payloads[-2:]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    tokens = sum(bool(p["choices"][0]["delta"].get("content")) for p in payloads)
    assert tokens >= 50  # every token arrived (a few may merge into one chunk at UTF-8 boundaries)


def test_streams_past_the_grace_period_end_with_an_error_event_and_done(tmp_path):
    proc, url, log = start_server(tmp_path, grace=1)
    try:
        events, took = terminate_during_stream(url, proc, max_tokens=400)
    finally:
        proc.kill()
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last["error"]["code"] == "shutting_down" and "shutting down" in last["error"]["message"]
    assert took < 15, log.read_text()[-2000:]  # exits soon after the grace period, not when generation ends
