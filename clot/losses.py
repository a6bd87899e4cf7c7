"""Token losses that run the output head only where they are needed.

A causal LM's forward turns every position's hidden state into logits over the whole vocabulary
([batch, seq, 151,936] for Qwen2.5-VL), and transformers' loss copies them to fp32: about 17 GB for
the 3B model at batch 4 × 2048. Only labelled positions (an answer: a few dozen tokens) need them.
So the model runs with its head passed through (`head_bypassed`), which makes its forward return
the final hidden states, and `label_log_probs` applies the head to the labelled rows only.

Generic over model families: the head is `model.get_output_embeddings()`, whatever holds it
(`lm_head` of Qwen2.5-VL, or of Qwen-VL-Chat's `QwenVLForCausalLM` under `transformer`).
"""

from __future__ import annotations

import contextlib

import torch

IGNORE = -100  # label value that no loss counts


def _pass_through(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


@contextlib.contextmanager
def head_bypassed(head: torch.nn.Module):
    """Within: `head` returns its input, so the model's forward returns its final hidden states in
    place of logits and no [batch, seq, vocab] tensor is made. Not thread-safe: callers hold the model."""
    previous = head.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hooks) is restored
    head.forward = _pass_through
    try:
        yield head
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def label_log_probs(hidden_states: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """log p(next token = its label) at every position, in fp32: [batch, seq - 1], 0 where unlabelled.

    `labels` are the model's usual labels (-100 where ignored; position t is predicted by t - 1).
    The head runs on the labelled positions only, so its logits are [labelled tokens, vocab].
    SFT takes the mean; a preference loss (DPO) sums each row for its sequence log-probability."""
    targets = labels[:, 1:].to(hidden_states.device)
    labelled = targets != IGNORE
    logits = head(hidden_states[:, :-1][labelled]).float()
    picked = -torch.nn.functional.cross_entropy(logits, targets[labelled], reduction="none")
    return torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(labelled, picked)


def causal_lm_loss(hidden_states: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                   num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """transformers' causal-LM loss (ForCausalLMLoss) computed on labelled rows only: the mean
    negative log-likelihood of the labelled tokens, or their sum over `num_items_in_batch` (the
    labelled tokens of a whole accumulated batch, as Trainer counts them for gradient accumulation)."""
    log_probs = label_log_probs(hidden_states, head, labels)
    if num_items_in_batch is None:
        num_items_in_batch = (labels[:, 1:] != IGNORE).sum()
    return -log_probs.sum() / torch.as_tensor(num_items_in_batch, device=log_probs.device)
