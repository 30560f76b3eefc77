"""Fine-tuning (llama3/finetune): data checks, target masks, losses against closed forms, the loop, the CLI.

Oracles: DPO's loss written out from its definition with ``math``; the SFT loss recomputed by hand (a
log-softmax per target position in float64); the target mask against the chat template's own rendering of the
prompt alone; a resumed run against the uninterrupted one (identical adapters).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from gguf_utils import write_tiny_gguf

import llama3
from llama3 import lora
from llama3.finetune import (DataError, ExampleBuilder, TrainConfig, Trainer, dpo_loss, load_dataset, lr_factor,
                             sequence_logprobs, sft_loss_sum, target_logprobs)
from llama3.lora import LoraConfig
from llama3.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Q8_0 model with a ChatML tokenizer (quantized base, as users fine-tune GGUF files)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("ft") / "tiny.gguf", seed=4)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and then?"},
                     {"role": "assistant", "content": "the end"}]}  # fmt: skip


def test_targets_are_the_answers_and_their_end_of_turn(tiny):
    tok = load_tokenizer(tiny)
    example = ExampleBuilder(tok).sft(CHAT, "x:1")
    dialog = CHAT["messages"]
    # The template's own rendering of everything before each answer is a prefix: what follows it, up to and
    # including <|im_end|>, is exactly what the model must learn to say.
    expected: list[bool] = []
    for i in (2, 4):
        prompt = tok.encode_dialog_prompt(dialog[:i], add_generation_prompt=True)
        answer = tok.encode(dialog[i]["content"], bos=False, eos=False)
        assert list(example.ids[len(prompt) : len(prompt) + len(answer)]) == answer
        expected += [False] * (len(prompt) - len(expected)) + [True] * (len(answer) + 1)
        assert example.ids[len(prompt) + len(answer)] == tok.eos_id  # <|im_end|> closes the turn
    expected += [False] * (len(example.ids) - len(expected))
    assert list(example.targets) == expected
    assert tok.decode([i for i, t in zip(example.ids, example.targets) if t]) == "hello<|im_end|>the end<|im_end|>"

    plain = ExampleBuilder(tok).sft({"prompt": "2+2=", "completion": " 4"}, "x:2")
    assert [i for i, t in zip(plain.ids, plain.targets) if t] == tok.encode(" 4", bos=False, eos=False) + [tok.eos_id]
    last = ExampleBuilder(tok).sft({"prompt": dialog[:4], "completion": "the end"}, "x:3")
    assert tok.decode([i for i, t in zip(last.ids, last.targets) if t]) == "the end<|im_end|>"


def test_sft_loss_is_the_cross_entropy_of_target_tokens(tiny):
    tok = load_tokenizer(tiny)
    model = llama3.load_model(tiny, device="cpu", dtype=torch.float32)
    example = ExampleBuilder(tok).sft(CHAT, "x:1")
    ids = torch.tensor([example.ids])
    targets = torch.tensor([example.targets], dtype=torch.float32)
    with torch.no_grad():
        out = model(ids)
    by_hand = 0.0
    for t in range(1, len(example.ids)):
        if example.targets[t]:
            row = out[0, t - 1].double()
            by_hand -= float(row[example.ids[t]] - torch.logsumexp(row, 0))
    assert math.isclose(float(sft_loss_sum(out, ids, targets)), by_hand, rel_tol=1e-5)
    assert math.isclose(float(sequence_logprobs(out, ids, targets)[0]), -by_hand, rel_tol=1e-5)
    # What the trainer computes: the head at target positions only.
    with torch.no_grad():
        logps, rows = target_logprobs(model, ids, targets)
    assert rows.tolist() == [0] * example.n_targets
    assert math.isclose(float(logps.sum()), -by_hand, rel_tol=1e-5)


def test_dpo_loss_closed_form():
    pc, pr, rc, rr, beta = [-3.0, -10.0], [-5.0, -2.0], [-4.0, -9.0], [-4.5, -3.0], 0.3
    losses, chosen, rejected = dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta)
    for i in range(2):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        assert math.isclose(float(losses[i]), -math.log(1 / (1 + math.exp(-z))), rel_tol=1e-6)
        assert math.isclose(float(chosen[i]), beta * (pc[i] - rc[i]), rel_tol=1e-6)
        assert math.isclose(float(rejected[i]), beta * (pr[i] - rr[i]), rel_tol=1e-6)


def test_learning_rate_schedule():
    total, warmup = 100, 10
    assert [lr_factor(s, total, warmup, 0.0) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert math.isclose(lr_factor(55, total, warmup, 0.0), 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lr_factor(100, total, warmup, 0.1), 0.1)


@pytest.mark.parametrize("record, message", [
    ("not json", r"bad\.jsonl:2: not valid JSON"),
    ([1, 2], r"bad\.jsonl:2: a record must be a JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2: messages: no assistant message"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, r"bad\.jsonl:2: messages: .*unknown role 'wizard'"),
    ({"prompt": "hi", "completion": 3}, r"bad\.jsonl:2: completion must be a string \(a int\)"),
    ({"text": "hi"}, r"bad\.jsonl:2: an SFT record needs 'messages', or 'prompt' and 'completion' \(found text\)"),
])  # fmt: skip
def test_malformed_lines_are_named(tiny, tmp_path, record, message):
    good = json.dumps(CHAT)
    bad = record if isinstance(record, str) else json.dumps(record)
    (tmp_path / "bad.jsonl").write_text(good + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path / "bad.jsonl", load_tokenizer(tiny), "sft", 256)


def test_dpo_records_are_checked(tiny, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: rejected must be a string \(missing\)"):
        load_dataset(path, load_tokenizer(tiny), "dpo", 256)


def train(model_path, data, out, config, **kwargs):
    tok = load_tokenizer(model_path)
    model = llama3.load_model(model_path, device="cpu", dtype=torch.float32)
    dataset = load_dataset(data, tok, config.method, 128)
    return Trainer(model, dataset, config, out, pad_id=tok.eos_id, **kwargs), model


def test_sft_lowers_the_loss_and_writes_its_outputs(tiny, tmp_path):
    records = [{"prompt": f"Q{i}:", "completion": f" answer {i % 3}"} for i in range(8)]
    data = write_jsonl(tmp_path / "t.jsonl", records)
    config = TrainConfig(epochs=12, batch_size=4, grad_accum=2, lr=1e-2, lora=LoraConfig(rank=8), warmup_ratio=0.1)
    trainer, model = train(tiny, data, tmp_path / "out", config,
                           eval_data=load_dataset(data, load_tokenizer(tiny), "sft", 128))
    result = trainer.train()
    losses = [r["loss"] for r in result.history if "loss" in r]
    evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
    assert result.steps == 12 and len(losses) == 12 and len(evals) == 12
    assert evals[-1] < 0.7 * evals[0]
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"):
        assert (tmp_path / "out" / name).is_file()
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # The saved adapter, loaded into a fresh model, is the trained one.
    fresh = llama3.load_model(tiny, device="cpu", dtype=torch.float32)
    lora.load_adapter(fresh, tmp_path / "out", "x")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), lora.adapters(model).using("train"), lora.adapters(fresh).using("x"):
        assert (model(ids) - fresh(ids)).abs().max() < 1e-5


def test_dpo_widens_the_margin(tiny, tmp_path):
    records = [{"prompt": f"Is {i} even?", "chosen": " yes" if i % 2 == 0 else " no",
                "rejected": " no" if i % 2 == 0 else " yes"} for i in range(6)]  # fmt: skip
    data = write_jsonl(tmp_path / "p.jsonl", records)
    config = TrainConfig(method="dpo", epochs=6, batch_size=3, lr=3e-3, beta=0.1, lora=LoraConfig(rank=4))
    trainer, _ = train(tiny, data, tmp_path / "out", config,
                       eval_data=load_dataset(data, load_tokenizer(tiny), "dpo", 128))
    result = trainer.train()
    evals = [r for r in result.history if "eval_loss" in r]
    assert len(evals) == 6
    assert evals[-1]["eval_reward_margin"] > 3 * evals[0]["eval_reward_margin"] > 0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < math.log(2)  # a no-op adapter scores log 2


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_resumed_run_equals_the_uninterrupted_one(tiny, tmp_path, method):
    records = ([{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(6)] if method == "sft" else
               [{"prompt": f"Q{i}:", "chosen": f" A{i}", "rejected": " no"} for i in range(6)])
    data = write_jsonl(tmp_path / "t.jsonl", records)
    config = TrainConfig(method=method, epochs=2, batch_size=2, lr=5e-3, save_every=2,
                         lora=LoraConfig(rank=4, dropout=0.2))
    full, _ = train(tiny, data, tmp_path / "full", config)
    full.train()

    class Stop(Exception):
        pass

    def stop_after_three(record):
        if record.get("step") == 3 and "loss" in record:
            raise Stop

    first, _ = train(tiny, data, tmp_path / "cut", config)
    with pytest.raises(Stop):
        first.train(progress=stop_after_three)
    second, _ = train(tiny, data, tmp_path / "cut", config)
    second.train(resume=True)
    a = (tmp_path / "full" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "cut" / "adapter_model.safetensors").read_bytes()
    assert a == b
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 7))

    # Another learning rate cannot resume this run; a fresh run (no resume) clears the old checkpoints.
    other = TrainConfig(**{**config.__dict__, "lr": 1e-3})
    third, _ = train(tiny, data, tmp_path / "cut", other)
    with pytest.raises(llama3.Llama3Error, match="other settings or data"):
        third.train(resume=True)
    fresh, _ = train(tiny, data, tmp_path / "cut", other)
    fresh.train()
    saved = sorted((tmp_path / "cut" / "checkpoints").glob("*/trainer_state.pt"))
    assert [p.parent.name for p in saved] == ["step-2", "step-4"]
    assert all(torch.load(p, weights_only=True)["config"]["lr"] == 1e-3 for p in saved)


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama3", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_finetune_then_chat_and_export(tiny, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [CHAT] * 4)
    out = tmp_path / "adapter"
    done = run_cli("finetune", "--model", str(tiny), "--data", data, "--out", str(out), "--epochs", "1",
                   "--batch-size", "2", "--lora-rank", "2", "--lora-targets", "q_proj,v_proj", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "adapter written to" in done.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (2, 4.0, ["q_proj", "v_proj"])
    answer = run_cli("complete", "hello", "--model", str(tiny), "--lora", str(out), "-n", "4", "-t", "0", "--no-stats")
    assert answer.returncode == 0, answer.stderr
    exported = run_cli("export", "--model", str(tiny), "--lora", str(out), "--out", str(tmp_path / "merged"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_cli_reports_bad_data_without_a_traceback(tiny, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
    done = run_cli("finetune", "--model", str(tiny), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o"))
    assert done.returncode == 1
    assert "bad.jsonl:1: messages: dialog is empty" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
    missing = run_cli("chat", "--model", str(tiny), "--lora", str(tmp_path / "none"))
    assert missing.returncode == 1 and "adapter directory not found" in missing.stderr


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    grads = []
    for recompute in (False, True):
        model = llama3.load_model(tiny, device="cpu", dtype=torch.float32)
        lora.add_adapter(model, "a", LoraConfig(rank=4), seed=0)
        with torch.no_grad():
            for _, _, module in lora.lora_modules(model, "a"):
                module.lora_B["a"].fill_(0.01)
        params = lora.trainable_parameters(model, "a")
        model.gradient_checkpointing = recompute
        ids = torch.tensor([[3, 9, 27, 81, 5, 17, 40, 2]])
        with lora.adapters(model).using("a"):  # backward too: recomputed layers read the engaged adapter again
            logps, _ = target_logprobs(model, ids, torch.ones(1, 8))
            logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
