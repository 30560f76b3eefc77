"""Embeddings: the Llama model's pooled hidden states against transformers, the bundled all-MiniLM-L6-v2 against
sentence-transformers itself, and ``/v1/embeddings`` + Ollama's routes through the real ``openai`` and ``ollama``
clients against a server process.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ollama
import openai
import pytest
import torch
import torch.nn.functional as F
from openai import OpenAI
from test_server import running_server

import llama3
from llama3.embedding import EmbeddingError, LlamaEmbedder, check_lengths, load_embedder, minilm_path, passes
from llama3.generation import Llama

IDS = [[128000, 5, 9, 100, 3, 7, 42], [128000, 11], [128000, 300, 301, 302, 303]]


def reference_embedding(model, ids: list[int], pooling: str) -> torch.Tensor:
    with torch.no_grad():
        h = model.model(torch.tensor([ids])).last_hidden_state[0]  # after the final norm, as ours
    pooled = h.mean(0) if pooling == "mean" else h[-1]
    return F.normalize(pooled, dim=-1)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_llama_pooling_matches_transformers(tiny_reference, hf_llama_dir, pooling):
    model = llama3.load_model(hf_llama_dir, device="cpu", dtype=torch.float32)
    tok = llama3.tokenizer.load_tokenizer(hf_llama_dir)
    ours = LlamaEmbedder(model, tok, pooling=pooling).embed_tokens(IDS)  # padded together in one pass
    for row, ids in zip(ours, IDS):
        ref = reference_embedding(tiny_reference, ids, pooling)
        assert (row - ref).abs().max().item() < 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(IDS)))


def test_embedding_leaves_the_kv_cache_and_the_generation_unchanged(hf_llama_dir):
    llm = Llama.build(hf_llama_dir, max_seq_len=32, max_batch_size=2, dtype=torch.float32)
    expected = llm.generate([IDS[0]], max_gen_len=6, temperature=0.0)[0]
    llm.scheduler.step()  # nothing queued: a no-op
    vectors = llm.embed(["hello there", "a second, longer text about something"])
    assert vectors.shape == (2, llm.model.config.dim)
    # The prefix cache still holds IDS[0]'s chunks and must still be right: same greedy tokens.
    assert llm.generate([IDS[0]], max_gen_len=6, temperature=0.0)[0] == expected
    assert torch.allclose(llm.embed(["hello there"])[0], vectors[0], atol=1e-6)


def test_minilm_equals_sentence_transformers_and_ranks_meaning():
    from sentence_transformers import SentenceTransformer

    texts = ["How do I reset my password?", "Steps to change the password of your account",
             "The weather in Paris is mild in spring."]
    ours = load_embedder("minilm")
    ids = ours.tokenize(texts)
    vectors = torch.cat([ours.embed_tokens([ids[i] for i in group]) for group in passes(ids)])
    order = [i for group in passes(ids) for i in group]
    mine = torch.empty_like(vectors)
    mine[order] = vectors
    ref = torch.tensor(SentenceTransformer(str(minilm_path()), device="cpu").encode(texts, normalize_embeddings=True))
    assert (mine - ref).abs().max().item() < 1e-5
    sims = mine @ mine.T
    assert sims[0, 1] > 0.5 > sims[0, 2]


def test_lengths_are_checked_or_truncated():
    with pytest.raises(EmbeddingError, match="input 1 is 5 tokens, more than this embedding model's limit of 4"):
        check_lengths([[1, 2], [1, 2, 3, 4, 5]], 4, truncate=False)
    assert check_lengths([[1, 2], [1, 2, 3, 4, 5]], 4, truncate=True) == [[1, 2], [1, 2, 3, 4]]
    with pytest.raises(EmbeddingError, match="input 0 is empty"):
        check_lengths([[]], 4, truncate=True)
    groups = list(passes([[0] * 100, [0] * 3000, [0] * 2000, [0] * 10], budget=4096))
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    assert groups[0] == [1]  # 3000 + 2000 padded to 3000 each would exceed the budget


# -- the server ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    with running_server(["--max-seq-len", "256", "--threads", "1", "--log-level", "warning"], tmp_path_factory,
                        "embed_llama") as url:
        yield url


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory):
    args = ["--max-seq-len", "256", "--threads", "1", "--log-level", "warning", "--embed-model", "minilm"]
    with running_server(args, tmp_path_factory, "embed_minilm") as url:
        yield url


def test_openai_client_on_the_served_llama_model(llama_server):
    client = OpenAI(base_url=llama_server + "/v1", api_key="none", max_retries=0)
    texts = ["the cat sat on the mat", "a dog barked", "the cat sat on the mat"]
    reply = client.embeddings.create(model="m", input=texts)
    vectors = np.array([d.embedding for d in reply.data])
    assert [d.index for d in reply.data] == [0, 1, 2] and vectors.shape == (3, 576)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5)  # same text, other batch position
    llm = Llama.build(None, max_seq_len=256, max_batch_size=1)
    assert np.allclose(vectors, llm.embed(texts).numpy(), atol=1e-4)  # the Meta-style API gives the same
    ids = llm.tokenizer.encode(texts[1], bos=True, eos=False)
    assert reply.usage.prompt_tokens == 2 * len(llm.tokenizer.encode(texts[0], bos=True, eos=False)) + len(ids)
    by_ids = client.embeddings.create(model="m", input=[ids])  # token-id input: the same vector
    assert np.allclose(by_ids.data[0].embedding, vectors[1], atol=1e-5)
    # The SDK asks for base64 by default when numpy is present; raw base64 decodes to the same floats.
    raw = client.embeddings.with_raw_response.create(model="m", input="a dog barked", encoding_format="base64")
    b64 = raw.http_response.json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(b64), dtype="<f4"), vectors[1], atol=1e-5)


def test_embeddings_do_not_disturb_concurrent_chats(llama_server):
    client = OpenAI(base_url=llama_server + "/v1", api_key="none", max_retries=0)

    def chat() -> str:
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Name three fruits."}],
                                           max_tokens=24, temperature=0)
        return r.choices[0].message.content

    alone = chat()
    with ThreadPoolExecutor(4) as pool:
        embeds = [pool.submit(client.embeddings.create, model="m", input=["text %d " % i * 40] * 8) for i in range(3)]
        chats = [pool.submit(chat) for _ in range(2)]
        assert [c.result() for c in chats] == [alone, alone]
        assert all(len(e.result().data) == 8 for e in embeds)


def test_bad_embedding_requests_are_400s(llama_server):
    client = OpenAI(base_url=llama_server + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="more than this embedding model's limit of 256"):
        client.embeddings.create(model="m", input="word " * 400)
    with pytest.raises(openai.BadRequestError, match="dimensions=8"):
        client.embeddings.create(model="m", input="x", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        client.embeddings.create(model="m", input=[[1, 10**9]])
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="m", input=[])


def test_ollama_client_and_truncation(llama_server):
    client = ollama.Client(host=llama_server, timeout=120)
    reply = client.embed(model="m", input=["the cat sat on the mat", "a dog barked"])
    assert len(reply.embeddings) == 2 and len(reply.embeddings[0]) == 576
    long = "word " * 400
    assert len(client.embed(model="m", input=long).embeddings[0]) == 576  # truncated, as Ollama does by default
    with pytest.raises(ollama.ResponseError, match="limit of 256"):
        client.embed(model="m", input=long, truncate=False)
    legacy = client.embeddings(model="m", prompt="a dog barked")
    assert np.allclose(legacy.embedding, reply.embeddings[1], atol=1e-5)


def test_dedicated_embedding_model_serves_minilm(minilm_server):
    from sentence_transformers import SentenceTransformer

    client = OpenAI(base_url=minilm_server + "/v1", api_key="none", max_retries=0)
    texts = ["How do I reset my password?", "The weather in Paris is mild in spring."]
    reply = client.embeddings.create(model="m", input=texts)
    ref = SentenceTransformer(str(minilm_path()), device="cpu").encode(texts, normalize_embeddings=True)
    assert reply.model == "all-MiniLM-L6-v2"
    assert np.allclose([d.embedding for d in reply.data], ref, atol=1e-5)
    # Chat still answers with the Llama model.
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.content
