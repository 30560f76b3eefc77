"""The project's exceptions: every error a user can cause is one of these, with a message that names the problem."""

from __future__ import annotations


class Llama3Error(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(Llama3Error):
    """A model file or directory is missing, unrecognised, corrupt or does not match its config."""


class TokenizerError(Llama3Error):
    """A tokenizer file cannot be read, or a dialog/message is malformed."""


class GenerationError(Llama3Error):
    """Invalid generation request: sampling values out of range, prompt too long, batch too large..."""


class ParallelError(Llama3Error):
    """The tensor-parallel process group failed: a rank died, stopped answering, or was set up inconsistently.
    Fatal to every sequence of the job (unlike a single request's error)."""
