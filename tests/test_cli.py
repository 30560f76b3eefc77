"""The ``llama3`` command end to end, in real subprocesses with the default model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def run(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llama3", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def test_complete_streams_and_reports_speed():
    result = run("complete", "The capital of France is", "--max-tokens", "12", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "Loaded" in result.stderr and "tok/s" in result.stderr


def test_complete_is_deterministic_when_greedy():
    a = run("complete", "Once upon a time", "-n", "10", "-t", "0", "--no-stats")
    b = run("complete", "Once upon a time", "-n", "10", "-t", "0", "--no-stats")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and a.stdout.strip() and a.stderr == ""


def test_scripted_chat_session():
    script = "What is the capital of France?\n/reset\nSay hello.\n/exit\nnever read\n"
    result = run("chat", "--max-tokens", "16", "--temperature", "0", "--system", "Answer briefly.", stdin=script)
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2  # one streamed answer per question
    assert "[conversation cleared]" in result.stderr
    assert result.stderr.count("tok/s") == 2  # two answers, then /exit stopped the session


def test_examples_print_meta_format():
    result = run("examples", "--max-tokens", "8", "--temperature", "0", "--no-stats", timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("==================================") == 8
    assert "I believe the meaning of life is\n> " in result.stdout
    assert "System: Always answer with Haiku" in result.stdout and "> Assistant: " in result.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["complete", "hi", "--top-p", "2"], "top_p"),
        (["complete", "hi", "--temperature", "-1"], "temperature"),
        (["complete", "hi", "--model", "/nonexistent/model.gguf"], "no such file or directory"),
        (["complete", "hi", "--max-seq-len", "0"], "max_seq_len"),
        (["complete", "hi", "--max-tokens", "0"], "max_gen_len"),
        (["chat", "--threads", "0"], "--threads"),
        (["complete", "hi", "--regex", "("], "regex"),
        (["complete", "hi", "--json-schema", '{"type": "hiccup"}'], "hiccup"),
        (["complete", "hi", "--json-schema", "/nonexistent/schema.json"], "schema.json"),
        (["complete", "hi", "--grammar", "root ::= nowhere"], "nowhere"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, needle):
    result = run(*args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Loaded")]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr


def test_output_constraints(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}')
    result = run("chat", "--json-schema", str(schema), "-n", "40", "-t", "0", "--no-stats", stdin="Is the sky blue?\n")
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout.strip())["ok"], bool)
    result = run("complete", "Five a's:", "--grammar", 'root ::= " " "a"{5}', "--no-stats")
    assert result.returncode == 0 and result.stdout.strip() == "aaaaa", result.stderr
    result = run("complete", "Numbers:", "--regex", "( [0-9]){3}", "-t", "1", "--no-stats")
    assert result.returncode == 0 and re.fullmatch("( [0-9]){3}", result.stdout.rstrip("\n")), result.stdout


def test_unknown_command_is_a_usage_error():
    result = run("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_default_context_fits_a_model_with_a_short_one(tiny_reference, checkpoint_tools, tmp_path):
    """--max-seq-len's default is 2048 or the model's context, whichever is smaller; only an explicit value
    beyond the model's context is an error."""
    import copy
    import shutil

    from llama3.assets import llama3_tokenizer_json

    model = copy.deepcopy(tiny_reference)
    model.config.max_position_embeddings = 512
    directory = checkpoint_tools.save_hf_checkpoint(model, tmp_path / "short")
    shutil.copy(llama3_tokenizer_json(), directory / "tokenizer.json")
    fits = run("complete", "Hello", "--model", str(directory), "-n", "4", "-t", "0", "--no-stats")
    assert fits.returncode == 0 and fits.stderr == "", fits.stderr
    explicit = run("complete", "Hello", "--model", str(directory), "-n", "4", "--max-seq-len", "2048")
    assert explicit.returncode != 0 and "context length 512" in explicit.stderr
    assert len(explicit.stderr.strip().splitlines()) == 1
