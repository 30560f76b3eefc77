"""Many concurrent chat requests against a real ``llama3 serve`` process, as a crowd of users would send them.

    python benchmarks/serve_load.py                       # 128 concurrent streaming chats, default model
    python benchmarks/serve_load.py --requests 256 --max-tokens 64 --max-queue 64 --out load.json

Starts the server (default model, ``--max-batch-size`` slots, ``--max-queue`` waiting), fires every request at
once (streaming, one connection each), and reports, by outcome, how many completed, got a 429 (with its
Retry-After) or anything else (lost: a connection error, a 5xx, an error event, a stream without ``[DONE]``
or a final finish_reason), with latency percentiles (time to first token and to the end) and the server's throughput.
Prints one JSON object (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOPICS = ["rivers", "owls", "bread", "trains", "maps", "the moon", "glass", "tea", "bees", "snow", "clocks", "salt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llama3.server", "--port", str(port), "--max-batch-size", str(args.max_batch_size),
           "--max-seq-len", str(args.max_seq_len), "--log-level", "warning"]
    if args.max_queue is not None:
        cmd += ["--max-queue", str(args.max_queue)]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up in 300 s")
        time.sleep(0.3)


async def one(http: httpx.AsyncClient, url: str, i: int, max_tokens: int, start: float) -> dict:
    """One streaming chat; its outcome and timings relative to ``start`` (when every request was fired).

    Raw HTTP with light parsing: the load generator shares the machine's cores with the server, and the SDK's
    per-chunk models would take CPU time from it.
    """
    messages = [{"role": "user", "content": f"Write a few sentences about {TOPICS[i % len(TOPICS)]}. ({i})"}]
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True}
    first, finish, chunks, done = None, None, 0, False
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code == 429:
                return {"outcome": "429", "retry_after": response.headers.get("retry-after")}
            if response.status_code != 200:
                return {"outcome": "lost", "why": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                elif '"error"' in line[:16]:
                    return {"outcome": "lost", "why": f"error event: {line[:200]}"}
                else:
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["delta"].get("content"):  # not the opening {"role": "assistant"} chunk
                        chunks += 1
                        first = first or time.perf_counter()
                    finish = choice["finish_reason"] or finish
    except httpx.HTTPError as exc:
        return {"outcome": "lost", "why": f"{type(exc).__name__}: {exc}"}
    end = time.perf_counter()
    if not done or finish not in ("stop", "length"):
        return {"outcome": "lost", "why": f"stream ended without [DONE] or a finish_reason ({finish})"}
    return {"outcome": "completed", "ttft": (first or end) - start, "latency": end - start, "chunks": chunks}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def crowd(port: int, requests: int, max_tokens: int) -> tuple[list[dict], float]:
    # One connection per request, as a crowd of separate users would open them.
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=requests + 8), timeout=3600) as http:
        start = time.perf_counter()
        url = f"http://127.0.0.1:{port}"
        results = await asyncio.gather(*(one(http, url, i, max_tokens, start) for i in range(requests)))
        return list(results), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=None, help="default: the server's default")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llama3-serve-load-{port}.log"
    proc = start_server(args, port, log_path)
    try:
        results, wall = asyncio.run(crowd(port, args.requests, args.max_tokens))
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(60)
    done = [r for r in results if r["outcome"] == "completed"]
    report = {
        "requests": args.requests, "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
        "max_queue": health.get("max_queue"), "wall_s": round(wall, 2),
        "completed": len(done), "rejected_429": sum(r["outcome"] == "429" for r in results),
        "lost": sum(r["outcome"] == "lost" for r in results),
        "lost_reasons": sorted({r["why"] for r in results if r["outcome"] == "lost"})[:5],
        "retry_after": sorted({r["retry_after"] for r in results if r["outcome"] == "429"}),
        "ttft_s": {q: percentile([r["ttft"] for r in done], p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "latency_s": {q: percentile([r["latency"] for r in done], p)
                      for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "generated_tokens": health.get("generated_tokens"),
        "tokens_per_s": round(health.get("generated_tokens", 0) / wall, 1),
        "mean_chunks": statistics.mean(r["chunks"] for r in done) if done else None,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
