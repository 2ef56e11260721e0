"""A weighted sum of losses that remembers each part, so the trainer can log them separately."""

from __future__ import annotations

import math
from collections.abc import Sequence

import paddle


def check_term_weight(name: str, weight: object) -> float:
    """`weight` as a float, or a ValueError saying which term is wrong."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"loss term {name}: weight must be a number, got {weight!r}")
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"loss term {name}: weight must be finite and > 0, got {weight}")
    return float(weight)


def unique_names(names: Sequence[str]) -> list[str]:
    """Names made unique by numbering repeats: [Dice, Dice] -> [Dice, Dice_2]."""
    seen: dict[str, int] = {}
    result = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        result.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return result


class MixedLoss(paddle.nn.Layer):
    """sum(weight * loss(logits, label)) over the terms.

    After each call `last_terms` maps each term's name (its class name, numbered if repeated)
    to its unweighted value as a detached tensor. Converting to Python floats would wait for
    the device every step, so that is left to `last_term_values()`, called when logging.
    With auxiliary heads the trainer calls this once per head; `last_terms` holds the last call.
    """

    def __init__(self, terms: Sequence[tuple[paddle.nn.Layer, float]]):
        super().__init__()
        terms = list(terms)
        if not terms:
            raise ValueError("MixedLoss needs at least one (loss, weight) term")
        names = unique_names([type(loss).__name__ for loss, _ in terms])
        self.weights = [check_term_weight(n, w) for n, (_, w) in zip(names, terms)]
        self.losses = paddle.nn.LayerList([loss for loss, _ in terms])
        self.names = names
        self.last_terms: dict[str, paddle.Tensor] = {}

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        values = [loss(logits, label) for loss in self.losses]
        self.last_terms = {name: v.detach() for name, v in zip(self.names, values)}
        total = self.weights[0] * values[0]
        for weight, value in zip(self.weights[1:], values[1:]):
            total = total + weight * value
        return total

    def last_term_values(self) -> dict[str, float]:
        """The last call's unweighted term values as floats (syncs the device; call to log)."""
        return {name: float(value) for name, value in self.last_terms.items()}

    def extra_repr(self) -> str:
        return ", ".join(f"{n}*{w:g}" for n, w in zip(self.names, self.weights))
