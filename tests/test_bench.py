"""``llama3 bench`` and ``benchmarks/compare.py``: workloads, plumbing, figures and the comparison table.

Timings are never asserted (they depend on the machine); what is checked: the workloads are the ones
described (exact lengths, seeded), the benchmark's greedy tokens are what transformers' reference model
picks, every row generates its budget, the JSON has the documented figures, and the comparison's ratios and
target verdicts are the hand-computed ones.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama3 import Llama
from llama3.assets import default_model_path
from llama3.bench import FORBID, Workloads, make_workloads, measure
from llama3.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = load_compare()


@pytest.fixture(scope="module")
def smollm_tokenizer():
    return load_tokenizer(default_model_path())


def test_workloads_have_exact_seeded_lengths(smollm_tokenizer):
    w = make_workloads(smollm_tokenizer, prompt_tokens=256, gen_tokens=128, batch=32, batch_gen_tokens=32, seed=0)
    rng = random.Random(0)
    assert [len(p) for p in w.batch_prompts] == [rng.randint(100, 400) for _ in range(32)]
    assert len(w.prompt) == 256 and w.gen_tokens == 128 and w.batch_gen_tokens == 32
    assert len({tuple(p[:50]) for p in w.batch_prompts + [w.prompt]}) == 33  # all different texts
    assert w.forbidden == sorted(smollm_tokenizer.stop_tokens) == [0, 2]  # SmolLM2: <|endoftext|>, <|im_end|>
    text = smollm_tokenizer.decode(w.prompt)
    assert text.count(".") >= 10 and text.isascii()  # plain English sentences, no special tokens
    again = make_workloads(smollm_tokenizer, prompt_tokens=256, gen_tokens=128, batch=32, batch_gen_tokens=32, seed=0)
    assert again == w
    assert make_workloads(smollm_tokenizer, seed=1).prompt != w.prompt
    assert w.context == max([256 + 128] + [n + 32 for n in map(len, w.batch_prompts)])


def test_workloads_round_trip_through_json(smollm_tokenizer, tmp_path):
    w = make_workloads(smollm_tokenizer, prompt_tokens=20, gen_tokens=4, batch=3, batch_lengths=(5, 9))
    w.save(tmp_path / "w.json")
    assert Workloads.load(tmp_path / "w.json") == w


def test_measure_matches_transformers_greedy(hf_llama_dir, tiny_reference):
    """The benchmark's decode tokens are the reference model's greedy choices with stop tokens ruled out,
    and every batch row generates exactly its budget; the engine stays usable afterwards."""
    llm = Llama.build(hf_llama_dir, max_seq_len=64, max_batch_size=1)
    w = make_workloads(llm.tokenizer, prompt_tokens=12, gen_tokens=6, batch=3, batch_lengths=(4, 20), batch_gen_tokens=5)
    result = measure(llm, w, repeat=2, warmup=1)
    tokens = result["decode_tokens"]
    assert len(tokens) == 6
    with torch.no_grad():  # teacher-forced: one full forward of transformers over prompt + generated
        logits = tiny_reference(torch.tensor([w.prompt + tokens])).logits[0].float()
    logits[:, w.forbidden] = float("-inf")
    assert logits[len(w.prompt) - 1 : -1].argmax(-1).tolist() == tokens
    assert result["batched_tokens"] == 15
    for key in ("prefill_tok_s", "decode_tok_s", "batched_tok_s"):
        s = result[key]
        assert len(s["runs"]) == 2 and s["min"] <= s["median"] <= s["max"] and s["min"] > 0
    assert 0 < result["peak_rss_mb_single"] <= result["peak_rss_mb"]
    assert "baseline_rss_mb" not in result  # measure() runs on a loaded model; run() adds the baseline
    out, _ = llm.generate([w.prompt], 6, temperature=0, logit_bias={t: FORBID for t in w.forbidden})
    assert out[0] == tokens


def test_peak_rss_is_the_process_own():
    """A child's figure is its own, not its parent's: ru_maxrss would report at least the parent's 1 GiB."""
    ballast = bytearray(2**30)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so that it is resident
    code = "from llama3.bench import peak_rss_mb; x = bytearray(80 * 2**20); x[::4096] = b'x' * len(x[::4096]); print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert 80 < child < 1024  # torch + 80 MiB, about 300 MiB
    del ballast


def test_bench_command_writes_json(hf_llama_dir, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "llama3", "bench", "--model", str(hf_llama_dir), "--prompt-tokens", "10",
           "--gen-tokens", "3", "--batch", "2", "--batch-min", "4", "--batch-max", "8", "--batch-gen-tokens", "2",
           "--repeat", "1", "--warmup", "0", "--max-seq-len", "32", "--threads", "1", "--chat-history", "600",
           "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for label in ("load", "prefill", "decode", "batched", "peak RSS", "chat turn 8"):
        assert label in done.stdout
    result = json.loads(out.read_text())
    assert result["engine"] == "llama3" and result["threads"] == 1
    assert result["workload"]["prompt_tokens"] == 10 and len(result["decode_tokens"]) == 3
    assert all(4 <= n <= 8 for n in result["workload"]["batch_prompt_tokens"])
    assert result["batched_tokens"] == 4 and result["load_s"] > 0
    assert 0 < result["baseline_rss_mb"] <= result["peak_rss_mb_single"] <= result["peak_rss_mb"]
    chat = result["chat_ttft"]  # the 7th turn's whole prefill chunks are reused by the 8th
    assert chat["history_tokens"] >= 600 and 256 <= chat["reused_tokens"] <= chat["history_tokens"]


def test_bench_command_rejects_a_short_context(hf_llama_dir):
    cmd = [sys.executable, "-m", "llama3", "bench", "--model", str(hf_llama_dir), "--prompt-tokens", "30",
           "--gen-tokens", "10", "--batch", "0", "--max-seq-len", "32"]  # fmt: skip
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "need 40 positions" in done.stderr and "--max-seq-len" in done.stderr


# -- benchmarks/compare.py -------------------------------------------------------------------------------------


def test_compare_defaults_are_the_issue_workloads():
    args = compare.parse_args([])
    assert args.threads == 2 and args.repeat == 3 and args.warmup == 1
    assert (args.prompt_tokens, args.gen_tokens, args.batch, args.batch_gen_tokens) == (256, 128, 32, 32)
    assert (args.batch_min, args.batch_max) == (100, 400)
    assert args.engines == ["llama3", "llama.cpp", "transformers"] and args.out == "bench-results.json"
    with pytest.raises(SystemExit):
        compare.parse_args(["--repeat", "0"])


def test_first_divergence():
    assert compare.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert compare.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert compare.first_divergence([1, 2], [1, 2, 3]) == 2
    assert compare.first_divergence(list(range(40)), list(range(32)) + [0] * 8) is None  # only 32 compared


def _figures(prefill, decode, batched, **extra):
    def s(x):
        return {"median": x, "min": x, "max": x, "runs": [x]}

    return {"prefill_tok_s": s(prefill), "decode_tok_s": s(decode), "batched_tok_s": s(batched), **extra}


def test_table_ratios_and_targets():
    mib = 2**20
    engines = {
        "llama3": _figures(420.0, 120.0, 1050.0, load_s=1.0, cold_start_s={"median": 2.5, "min": 2.4, "max": 2.7, "runs": [2.4, 2.5, 2.7]},
                           peak_rss_mb_single=150.0, peak_rss_mb=900.0, decode_tokens=[5, 6, 7]),
        "llama.cpp": _figures(300.0, 100.0, 100.0, load_s=0.5, peak_rss_mb_single=300.0, decode_tokens=[5, 6, 7]),
        "transformers": _figures(450.0, 20.0, 700.0, load_s=20.0, peak_rss_mb_single=1200.0, decode_tokens=[5, 9, 7]),
    }  # fmt: skip
    verdict = compare.evaluate(engines, gguf_bytes=100 * mib)
    r = verdict["ratios"]
    assert r["llama.cpp"]["decode_tok_s"] == pytest.approx(1.2)
    assert r["transformers"]["decode_tok_s"] == pytest.approx(6.0)
    assert r["llama.cpp"]["prefill_tok_s"] == pytest.approx(1.4)
    assert r["llama.cpp"]["batched_tok_s"] == pytest.approx(10.5)
    assert r["transformers"]["batched_tok_s"] == pytest.approx(1.5)
    assert r["llama.cpp"]["load_s"] == pytest.approx(0.5)  # lower is better: peer / ours
    assert r["transformers"]["peak_rss_mb_single"] == pytest.approx(8.0)
    assert r["llama.cpp"]["cold_start_s"] is None  # peer figure missing
    met = [t["met"] for t in verdict["targets"]]
    # decode vs llama.cpp, decode vs tf, prefill vs llama.cpp, batched vs llama.cpp, batched vs tf, cold, memory
    assert met == [True, True, False, True, False, True, True]
    assert verdict["agreement"]["llama.cpp"]["first_divergence"] is None
    assert verdict["agreement"]["transformers"]["first_divergence"] == 1

    table = compare.format_table(engines, verdict)
    decode_row = next(line for line in table.splitlines() if line.startswith("decode"))
    assert decode_row.split()[-5:] == ["120.0", "100.0", "20.0", "1.20x", "6.00x"]
    assert "NOT MET" in table and "first divergence at token 1" in table and "identical" in table


def test_table_with_a_skipped_peer():
    engines = {
        "llama3": _figures(400.0, 100.0, 900.0, load_s=1.0, peak_rss_mb_single=150.0),
        "llama.cpp": {"skipped": "skipped: llama-cpp-python is not installed"},
        "transformers": _figures(400.0, 20.0, 300.0, load_s=20.0, cold_start_error="python ... exited 1 without output"),
    }
    verdict = compare.evaluate(engines, gguf_bytes=50 * 2**20)
    by_target = {t["target"]: t["met"] for t in verdict["targets"]}
    assert by_target["decode_tok_s >= 1x llama.cpp"] is None
    assert by_target["decode_tok_s >= 4x transformers"] is True
    assert [m for t, m in by_target.items() if t.startswith("peak_rss")] == [False]  # 150 MiB > 2 x 50 MiB
    table = compare.format_table(engines, verdict)
    assert "vs llama.cpp" not in table.splitlines()[0] and "vs transformers" in table.splitlines()[0]
    assert "llama-cpp-python is not installed" in table and "n/a" in table
    assert "transformers: python ... exited 1 without output" in table


def test_memory_above_imports():
    engines = {
        "llama3": _figures(400.0, 100.0, 900.0, peak_rss_mb_single=350.0, baseline_rss_mb=230.0),
        "llama.cpp": _figures(300.0, 100.0, 100.0, peak_rss_mb_single=270.0, baseline_rss_mb=30.0),
        "transformers": {"error": "worker failed"},
    }
    compare.add_derived(engines)
    assert engines["llama3"]["model_rss_mb"] == 120.0 and engines["llama.cpp"]["model_rss_mb"] == 240.0
    assert compare.evaluate(engines, gguf_bytes=2**20)["ratios"]["llama.cpp"]["model_rss_mb"] == pytest.approx(2.0)
    assert "of which above imports (MiB)" in compare.format_table(engines, compare.evaluate(engines, 2**20))


def test_time_to_first_byte_waits_for_output():
    child = [sys.executable, "-c", "import time; time.sleep(0.3); print('x', flush=True); time.sleep(0.3)"]
    ballast = bytearray(300 * 2**20)  # the parent's size must not be charged to the child (ru_maxrss would)
    seconds, peak_mb = compare.time_to_first_byte(child)
    assert 0.3 <= seconds < 0.6 + 5  # the first byte, not the exit
    assert 1 < peak_mb < 100, peak_mb
    del ballast
    with pytest.raises(RuntimeError):
        compare.time_to_first_byte([sys.executable, "-c", "raise SystemExit(3)"])


@pytest.mark.slow
def test_compare_end_to_end(tmp_path):
    """One command, every installed engine, tiny workloads: a table and a JSON with ratios and agreement."""
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--prompt-tokens", "24", "--gen-tokens", "6",
           "--batch", "3", "--batch-min", "8", "--batch-max", "24", "--batch-gen-tokens", "3", "--repeat", "1",
           "--warmup", "0", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["threads"] == 2 and result["machine"]["cores"] >= 1
    ours = result["engines"]["llama3"]
    assert ours["batched_tokens"] == 9 and ours["cold_start_s"]["median"] > 0
    for peer in ("llama.cpp", "transformers"):
        theirs = result["engines"][peer]
        if "skipped" in theirs:
            continue
        assert theirs["batched_tokens"] == 9 and len(theirs["decode_tokens"]) == 6
        assert result["ratios"][peer]["decode_tok_s"] > 0 and peer in result["agreement"]
    assert "targets" in done.stdout and "decode (tok/s)" in done.stdout
