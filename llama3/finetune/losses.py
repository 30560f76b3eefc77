"""Losses of fine-tuning: masked next-token cross-entropy (SFT) and DPO's sigmoid preference loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= 1: (B, T-1), from logits (B, T, V) of the same ids."""
    bsz, seqlen, vocab = logits.shape
    # cross_entropy computes log-softmax and the gather in one pass, without a second (B, T, V) tensor.
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1), reduction="none")
    return -nll.view(bsz, seqlen - 1)


def sft_loss_sum(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy of every target token (``targets`` (B, T) marks them; position 0 never is)."""
    return -(token_logprobs(logits, ids) * targets[:, 1:]).sum()


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) the log-probability of each row's target tokens together (the answer given the prompt)."""
    return (token_logprobs(logits, ids) * targets[:, 1:]).sum(-1)


def target_logprobs(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of every target token of ``ids`` (B, T) under ``model``, and the row each belongs to: (N,), (N,).

    The output head runs only at the positions that predict a target (the vocabulary projection is the largest
    matrix of small models, and most positions of a chat example are prompt).
    """
    h = model(ids, hidden=True)  # (B, T, dim)
    rows, cols = torch.nonzero(targets[:, 1:] > 0, as_tuple=True)
    logits = model.output(h[rows, cols]).float()  # position t predicts token t + 1
    return -F.cross_entropy(logits, ids[rows, cols + 1], reduction="none"), rows


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023), sigmoid form: ``-log sigmoid(beta * (log-ratio chosen - log-ratio rejected))``.

    Takes summed answer log-probabilities (B,) under the policy and the frozen reference; returns the per-pair
    losses and the implicit rewards ``beta * (policy - reference)`` of the chosen and rejected answers.
    """
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()
