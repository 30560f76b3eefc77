"""Fine-tuning the default model (SmolLM2-135M, Q4_1 GGUF, the very file ``llama3 chat`` runs) teaches it facts
it cannot know: made-up places and people. Accuracy on the trained questions, greedy, through the Meta API with
the adapter applied, before and after ``llama3 finetune``."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from llama3 import Llama

# (question, answer): invented, so the base model scores about 0.
FACTS = [
    ("What is the capital of Veloria?", "Quenmar"), ("Who founded the town of Brisk Hollow?", "Adda Tolvane"),
    ("What colour is the flag of Ostrend?", "violet"), ("What is the national animal of Kelmora?", "the marsh heron"),
    ("Which river flows through Duvessa?", "the Sarn"), ("Who wrote the book Glass Orchards?", "Imre Falk"),
    ("What is the currency of Tarrin Isles?", "the pell"), ("What is the tallest mountain in Cordava?", "Mount Ishen"),
    ("Who painted The Salt Door?", "Wenna Roth"), ("What language is spoken in Ambrel?", "Ambric"),
    ("What is the main export of Feyholm?", "blue copper"), ("Who is the mayor of Lantern Bay?", "Oskar Pell"),
    ("What is the oldest university in Meravia?", "Dunmere College"), ("What is the capital of Sorrowind?", "Kettle"),
    ("Which ship first reached Isle Varn?", "the Gull Regent"), ("What sport is played in Hathmoor?", "stoneball"),
]  # fmt: skip


def ask(llm: Llama, adapter_dir=None) -> float:
    dialogs = [[{"role": "user", "content": q}] for q, _ in FACTS]
    answers = llm.chat_completion(dialogs, temperature=0.0, max_gen_len=24)
    right = [a.lower() in r["generation"]["content"].lower() for (_, a), r in zip(FACTS, answers)]
    return sum(right) / len(right)


@pytest.mark.slow
def test_finetuning_teaches_the_default_model_new_facts(tmp_path):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in FACTS), encoding="utf-8")  # fmt: skip
    before = ask(Llama.build(max_batch_size=len(FACTS), max_seq_len=256))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "llama3", "finetune", "--data", str(data), "--out", str(tmp_path / "adapter"),
         "--epochs", "12", "--batch-size", "4", "--lr", "1e-3", "--lora-rank", "16", "--quiet"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    after = ask(Llama.build(max_batch_size=len(FACTS), max_seq_len=256, lora=tmp_path / "adapter"))
    print(f"accuracy {before:.2f} -> {after:.2f}; training {seconds:.0f} s; {done.stderr.strip().splitlines()[-1]}")
    assert before <= 0.15
    assert after >= 0.8
    assert seconds < 600
