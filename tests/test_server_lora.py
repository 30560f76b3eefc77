"""Several LoRA adapters over one base model in one server (``llama3 serve --lora NAME=DIR``), chosen by the
request's ``model`` as vLLM does, batched together: the real ``openai`` client against a real server process.

Oracles: the Meta API with the same adapter (``Llama.build(lora=...)``), and each request answered alone versus
in a crowd of requests for other adapters.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from openai import AsyncOpenAI, OpenAI
from test_server import launch, shut

from llama3 import Llama, lora, load_model
from llama3.assets import default_model_path

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Two random adapters for the default model (different targets and ranks), written in PEFT's format."""
    root = tmp_path_factory.mktemp("adapters")
    model = load_model(default_model_path(), device="cpu", dtype=torch.float32)
    dirs = {}
    for seed, (name, config) in enumerate({"terse": lora.LoraConfig(rank=8),
                                           "shop": lora.LoraConfig(rank=4, targets=("wv", "w2"))}.items()):
        lora.add_adapter(model, name, config, seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, _, module in lora.lora_modules(model, name):
                module.lora_B[name].copy_(torch.randn(module.lora_B[name].shape, generator=g) * 0.02)
        dirs[name] = lora.save_adapter(model, name, root / name)
    return dirs


@pytest.fixture(scope="module")
def server(adapter_dirs, tmp_path_factory):
    args = ["--max-seq-len", "256", "--max-batch-size", "4", "--threads", "1", "--log-level", "warning",
            "--lora", f"terse={adapter_dirs['terse']}", "--lora", f"shop={adapter_dirs['shop']}"]
    proc, url = launch(args, tmp_path_factory.mktemp("lora_server") / "server.log")
    try:
        yield url
    finally:
        shut(proc)


def ask(client, model: str) -> tuple[str, str]:
    r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
    return r.model, r.choices[0].message.content


def test_each_model_name_answers_with_its_adapter_alone_and_in_a_crowd(server, adapter_dirs):
    client = OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=120)
    listed = {m.id: getattr(m, "parent", None) for m in client.models.list().data}
    base = default_model_path().stem
    assert listed == {base: None, "terse": base, "shop": base}

    alone = {name: ask(client, name) for name in (base, "terse", "shop")}
    assert {name: answered_by for name, (answered_by, _) in alone.items()} == {n: n for n in alone}
    assert len({text for _, text in alone.values()}) == 3  # three different models

    llm = Llama.build(max_seq_len=256, max_batch_size=1, lora=adapter_dirs["terse"])
    (expected,) = llm.chat_completion([QUESTION], temperature=0.0, max_gen_len=16)
    assert alone["terse"][1] == expected["generation"]["content"]

    async def crowd():
        aclient = AsyncOpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=120)
        names = [base, "terse", "shop"] * 3
        results = await asyncio.gather(*(aclient.chat.completions.create(
            model=n, messages=QUESTION, temperature=0, max_tokens=16) for n in names))
        return [(n, r.choices[0].message.content) for n, r in zip(names, results)]

    for name, text in asyncio.run(crowd()):
        assert text == alone[name][1], name
    # With adapters loaded, a name that is neither the base nor an adapter is a 404, never silently the base.
    import openai

    with pytest.raises(openai.NotFoundError, match="model 'terse2' does not exist"):
        ask(client, "terse2")


def test_bad_adapter_flags_fail_with_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "llama3", "serve", "--lora", f"x={tmp_path / 'missing'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "adapter directory not found" in done.stderr and "Traceback" not in done.stderr
