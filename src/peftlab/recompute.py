"""Gradient checkpointing's price: the bytes a training step keeps for backward, and its
time, with and without recomputing the blocks.

Measured in the chapter *A first QLoRA finetune* (book/chapters/practice.md) and in
*Questions people ask* (book/chapters/questions.md).

With checkpointing, a block's forward keeps only its input; backward runs the block's
forward again to rebuild what it needs. So the memory of the activations falls to one
block's worth plus the checkpoints, and the step pays about one more forward pass of the
blocks. :func:`checkpointing_cost` measures both on a Hugging Face causal LM: the bytes
autograd saves (:func:`peftlab.measure.count_saved_bytes`) and the medians of
alternating timed steps, each ratio taken within one round so that a change of the
machine's load between rounds cancels, and times a forward pass alone, from which the
extra forward predicts the slowdown.
"""

from __future__ import annotations

import copy
import statistics
from typing import NamedTuple

import torch
from torch import nn

from peftlab.devices import Stopwatch
from peftlab.measure import count_saved_bytes

__all__ = ["CheckpointingCost", "checkpointing_cost", "enable_checkpointing"]


class CheckpointingCost(NamedTuple):
    """What :func:`checkpointing_cost` measured. Seconds and ratios are medians over
    ``repeats`` rounds; each ratio is taken within a round, then the median of the
    rounds' ratios is kept."""

    step_seconds: float  # forward + backward, no checkpointing
    checkpointed_seconds: float  # forward + backward, every block checkpointed
    forward_seconds: float  # the forward pass alone (building the graph)
    time_ratio: float  # checkpointed step over plain step, per round
    predicted_ratio: float  # 1 + forward / plain step, per round: one more forward
    saved_bytes: int  # kept for backward across the forward, no checkpointing
    checkpointed_saved_bytes: int  # the same, every block checkpointed
    repeats: int

    @property
    def memory_ratio(self) -> float:
        """Bytes kept for backward without checkpointing over bytes kept with it."""
        return self.saved_bytes / self.checkpointed_saved_bytes


def enable_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on transformers' gradient checkpointing of every block (non-reentrant,
    which needs no input that requires a gradient, so it works with frozen embeddings
    and LoRA). Returns ``model``.

    Note: transformers 5 calls it ``activation_checkpointing_enable``; the old name
    still works there, with a warning, so the new one is used where it exists.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TypeError(
            f"model must be a transformers PreTrainedModel, got {type(model).__name__}"
        )
    enable({"use_reentrant": False})
    return model


def checkpointing_cost(
    model: nn.Module, input_ids: torch.Tensor, repeats: int = 7
) -> CheckpointingCost:
    """Measure one training step of ``model`` (a transformers causal LM, its trainable
    parameters already chosen) on ``input_ids`` (its own labels), without and with
    gradient checkpointing.

    A deep copy of ``model`` gets the checkpointing; ``model`` itself is left as it was.
    Steps are forward + backward (the optimizer's step is the same either way and would
    only dilute the ratio); gradients are cleared between calls. Each of ``repeats``
    rounds times a plain step, a checkpointed step and a forward pass alone, in an order
    reversed every other round, on the threads the caller set; one warm-up round first.
    The predicted ratio, ``1 + forward / step``, is what exactly one more forward pass
    would cost (an upper bound in that sense: the embeddings, the head and the loss are
    not recomputed, only the blocks).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            "input_ids must be a 2-D tensor of token ids (batch × sequence)"
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    plain = model.train()
    checkpointed = enable_checkpointing(copy.deepcopy(model)).train()

    def step(m: nn.Module):
        def run() -> None:
            m.zero_grad(set_to_none=True)
            m(input_ids=input_ids, labels=input_ids).loss.backward()

        return run

    def forward() -> None:
        plain(input_ids=input_ids, labels=input_ids)  # the graph is built, then dropped

    def saved(m: nn.Module) -> int:
        with count_saved_bytes(exclude=list(m.parameters())) as counter:
            loss = m(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        m.zero_grad(set_to_none=True)
        return counter.nbytes

    fns = {"plain": step(plain), "checkpointed": step(checkpointed), "forward": forward}
    for fn in fns.values():
        fn()  # warm-up: first-call allocations and lazy initialisation
    rounds: list[dict[str, float]] = []
    for i in range(repeats):
        seconds = {}
        for name, fn in list(fns.items())[:: 1 if i % 2 == 0 else -1]:
            watch = Stopwatch()
            with watch:
                fn()
            seconds[name] = watch.seconds
        rounds.append(seconds)

    def median(f) -> float:
        return statistics.median(f(r) for r in rounds)

    return CheckpointingCost(
        step_seconds=median(lambda r: r["plain"]),
        checkpointed_seconds=median(lambda r: r["checkpointed"]),
        forward_seconds=median(lambda r: r["forward"]),
        time_ratio=median(lambda r: r["checkpointed"] / r["plain"]),
        predicted_ratio=median(lambda r: 1.0 + r["forward"] / r["plain"]),
        saved_bytes=saved(plain),
        checkpointed_saved_bytes=saved(checkpointed),
        repeats=repeats,
    )
