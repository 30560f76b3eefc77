"""Tensor parallelism (``llama3.parallel``) as users run it: real ``torchrun`` jobs of 2 gloo processes.

Oracles: the same checkpoint in one process (logits, KV-cached logits, greedy and seeded sampled tokens), the
single-process quantized path's own error against the float expansion, the real ``openai`` client against
``torchrun -m llama3 serve``, and a rank killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import save_meta_checkpoint, tiny_hf_config, make_reference_model, save_hf_checkpoint
from gguf import GGMLQuantizationType as Q
from gguf_utils import write_tiny_gguf
from test_server import free_port, shut
from test_shopbench_data import DEV, needs_dev

import llama3
from llama3.errors import ParallelError
from llama3.generation import Llama
from llama3.parallel.plan import ShardPlan

ROOT = Path(__file__).parent.parent
WORKER = Path(__file__).parent / "tp_worker.py"
PROMPT = torch.tensor([[1, 5, 9, 100, 3, 7, 42, 8]])
PROMPTS = [[1, 5, 9, 100, 3], [7, 42, 8]]


def torchrun(*args: str, nproc: int = 2, timeout: float = 300, stdin: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin, cwd=ROOT,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def checkpoints(tiny_reference, hf_llama_dir, meta_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    # One kv head for 2 ranks (the KV cache replicated) and a vocabulary that does not split evenly.
    gqa = make_reference_model(tiny_hf_config(num_key_value_heads=1, vocab_size=509), seed=5)
    return {
        "hf": hf_llama_dir,
        "meta1": meta_llama_dir,
        "meta2": save_meta_checkpoint(tiny_reference, root / "meta2", n_shards=2, tokenizer=True),
        "meta4": save_meta_checkpoint(tiny_reference, root / "meta4", n_shards=4, tokenizer=True),
        "hf_kv1": save_hf_checkpoint(gqa, root / "hf_kv1"),
        "q8": write_tiny_gguf(root / "q8.gguf", Q.Q8_0),
        "q4": write_tiny_gguf(root / "q4.gguf", Q.Q4_0),
        # 6 heads of 16 over 2 ranks: wo's 48 input columns per rank are not whole Q8_0 blocks of 32.
        "q8_unaligned": write_tiny_gguf(root / "q8u.gguf", Q.Q8_0, dim=96, n_heads=6, n_kv_heads=2, hidden_dim=128),
    }


GENERATE = ("hf", "meta1", "meta2", "meta4", "q8")


@pytest.fixture(scope="module")
def tp_results(checkpoints, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("tp_out") / "results.pt"
    specs = [f"{path}:generate" if key in GENERATE else str(path) for key, path in checkpoints.items()]
    proc = torchrun(str(WORKER), str(out), *specs)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out)
    return {"reduced": results["reduced"]} | {key: results[str(path)] for key, path in checkpoints.items()}


def test_all_reduce_sums_small_and_large_tensors(tp_results):
    for n, reduced in tp_results["reduced"].items():
        assert torch.equal(reduced, torch.arange(n, dtype=torch.float32) * 3), n  # 1x + 2x, exact in float32


@torch.inference_mode()
def single(path: Path, quantize: str | None = "auto") -> dict:
    model = llama3.load_model(path, device="cpu", dtype=torch.float32, quantize=quantize)
    result = {"full": model(PROMPT)}
    model.setup_cache(1, 32)
    model(PROMPT[:, :5], 0)
    result["cached"] = model(PROMPT[:, 5:], 5)
    return result


@pytest.mark.parametrize("key", ["hf", "meta1", "meta2", "meta4", "hf_kv1"])
def test_float_logits_equal_single_process(checkpoints, tp_results, key):
    ref, tp = single(checkpoints[key]), tp_results[key]
    for what in ("full", "cached"):
        assert tp[what].shape == ref[what].shape
        assert (tp[what] - ref[what]).abs().max().item() < 1e-5, what


@pytest.mark.parametrize("key", ["q8", "q4", "q8_unaligned"])
def test_quantized_logits_within_the_single_process_error(checkpoints, tp_results, key):
    exact = single(checkpoints[key], quantize=None)  # the float expansion of the same blocks
    quantized = single(checkpoints[key])
    for what in ("full", "cached"):
        own_error = (quantized[what] - exact[what]).abs().max().item()
        tp_error = (tp_results[key][what] - exact[what]).abs().max().item()
        assert tp_error <= 1.5 * own_error + 1e-5, (what, tp_error, own_error)


@pytest.mark.parametrize("key", GENERATE)
def test_generation_equals_single_process(checkpoints, tp_results, key):
    llm = Llama.build(checkpoints[key], max_seq_len=32, max_batch_size=2, dtype=torch.float32)
    assert tp_results[key]["greedy"] == llm.generate(PROMPTS, max_gen_len=6, temperature=0.0)[0]
    assert tp_results[key]["sampled"] == llm.generate(PROMPTS, max_gen_len=6, temperature=1.0, top_p=1.0, seed=7)[0]


def test_each_rank_holds_about_half_the_weights(checkpoints, tp_results):
    for key in ("meta2", "q8"):
        full = sum(t.numel() * t.element_size() for t in llama3.load_model(checkpoints[key], device="cpu",
                                                                           quantize=None).parameters())
        ranks = tp_results[key]["rank_bytes"]
        assert len(ranks) == 2 and all(r < 0.56 * full for r in ranks), (key, ranks, full)


def test_plan_refuses_splits_that_do_not_divide():
    from llama3.config import ModelConfig

    with pytest.raises(ParallelError, match="does not divide its 9 attention heads"):
        ShardPlan(ModelConfig(dim=576, n_heads=9, n_kv_heads=3, vocab_size=100, hidden_dim=1536), 0, 2)
    plan = ShardPlan(ModelConfig(dim=64, n_heads=4, n_kv_heads=1, vocab_size=10, hidden_dim=8), 1, 4)
    assert (plan.local_kv_heads, plan.first_kv_head, plan.vocab_start, plan.vocab_stop) == (1, 0, 3, 6)


def test_model_parallel_size_outside_torchrun_says_how_to_launch(checkpoints):
    with pytest.raises(llama3.errors.GenerationError, match="torchrun --nproc-per-node 2"):
        Llama.build(checkpoints["q8"], model_parallel_size=2)


def test_cli_complete_and_chat_under_torchrun(checkpoints):
    gguf = str(checkpoints["q8"])
    args = ["-m", "llama3", "complete", "--model", gguf, "hello world", "-t", "0.9", "--seed", "5", "-n", "12"]
    tp = torchrun(*args)
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert tp.returncode == 0 and one.returncode == 0, tp.stderr[-3000:]
    assert tp.stdout == one.stdout and tp.stdout.strip()  # rank 0 alone prints, the same text
    chat = ["-m", "llama3", "chat", "--model", gguf, "-t", "0", "-n", "8", "--no-stats"]
    tp = torchrun(*chat, stdin="hi there\nand again\n")
    one = subprocess.run([sys.executable, *chat], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         input="hi there\nand again\n")
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert tp.stdout == one.stdout and tp.stdout.count("\n") == 2


def test_indivisible_model_is_a_clear_cli_error():
    # The default model has 9 attention heads: 2 ranks cannot split them.
    proc = torchrun("-m", "llama3", "complete", "hi", "-n", "2")
    assert proc.returncode != 0
    # One line from each rank; torchrun then reports the failed children in its own words (and traceback).
    assert "llama3 complete: error: cannot split the model over 2 ranks" in proc.stderr
    assert "ParallelError" not in proc.stderr  # no raw traceback of ours


@needs_dev
def test_eval_shopbench_under_torchrun_matches_single_process(checkpoints, tmp_path):
    lines = DEV.read_text().splitlines()
    data = tmp_path / "slice.jsonl"
    data.write_text("\n".join(lines[i] for i in (4, 8, 12, 64)) + "\n")  # no task that needs the embedder
    args = ["-m", "llama3", "eval", "shopbench", str(data), "--model", str(checkpoints["q8"]), "--max-gen-len", "8",
            "--batch-size", "4", "--no-progress"]
    tp = torchrun(*args, "--out", str(tmp_path / "tp.json"))
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.json")], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert tp.returncode == 0 and one.returncode == 0, tp.stderr[-3000:] + one.stderr[-3000:]
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("tp", "one")]
    assert [q["raw_output"] for q in reports[0]["questions"]] == [q["raw_output"] for q in reports[1]["questions"]]
    assert len(reports[0]["questions"]) == 4 and tp.stdout.count("routing accuracy") == 1  # rank 0 alone reports


def _serve_cmd(gguf: Path, port: int) -> list[str]:
    return ["-m", "llama3", "serve", "--model", str(gguf), "--port", str(port), "--max-seq-len", "128",
            "--max-batch-size", "4", "--log-level", "warning"]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"server did not come up:\n{log.read_text()[-3000:]}")


def test_server_under_torchrun_answers_the_openai_client(checkpoints, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    gguf, port = checkpoints["q8"], free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *_serve_cmd(gguf, port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url, log)
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        llm = Llama.build(gguf, max_seq_len=128, max_batch_size=4)
        questions = ["hello", "what is two plus two", "name a colour"]
        expected = [llm.chat_completion([[{"role": "user", "content": q}]], max_gen_len=10, temperature=0.0)[0]
                    ["generation"]["content"] for q in questions]

        def ask(q: str) -> str:
            reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                                   max_tokens=10, temperature=0)
            return reply.choices[0].message.content

        assert [ask(q) for q in questions] == expected
        with ThreadPoolExecutor(3) as pool:  # continuous batching across the ranks
            assert list(pool.map(ask, questions)) == expected
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": questions[1]}],
                                                max_tokens=10, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected[1]
        # A client that goes away mid-stream: its sequence is cancelled on every rank at the same step.
        with httpx.stream("POST", url + "/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 100,
                                                                 "stream": True, "temperature": 1}) as r:
            next(r.iter_lines())
        assert ask(questions[0]) == expected[0]
    finally:
        shut(proc)  # (torchrun answers SIGTERM by terminating every rank and exiting 1 itself)


def test_killed_rank_ends_the_job_with_an_error_on_rank_0(checkpoints, tmp_path):
    port, master = free_port(), free_port()
    timeout_s = 10
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "WORLD_SIZE": "2",
           "LLAMA3_TP_TIMEOUT": str(timeout_s), "OMP_NUM_THREADS": "1"}
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"rank{rank}.log")
        with open(logs[-1], "wb") as out:
            procs.append(subprocess.Popen([sys.executable, *_serve_cmd(checkpoints["q8"], port)], stdout=out,
                                          stderr=subprocess.STDOUT, cwd=ROOT,
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    try:
        _wait_healthy(procs[0], f"http://127.0.0.1:{port}", logs[0])
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout_s + 30)
        waited = time.monotonic() - killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = logs[0].read_text()
    assert procs[0].returncode == 1, text[-3000:]
    assert "tensor-parallel job failed" in text and "Traceback" not in text, text[-3000:]
    assert waited < timeout_s + 30
