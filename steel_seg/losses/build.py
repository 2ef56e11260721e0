"""Build the training loss from PaddleX-style `(name, weight[, kwargs])` terms."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import paddle

# What PaddleX's `use_mixed_loss: true` trains with; the config owns PaddleX's vocabulary.
from steel_seg.config.schema import PADDLEX_MIXED_LOSS
from steel_seg.losses.cross_entropy import CrossEntropyLoss
from steel_seg.losses.dice import DiceLoss
from steel_seg.losses.lovasz import LovaszSoftmaxLoss
from steel_seg.losses.mixed import MixedLoss, check_term_weight

# Keys are PaddleX/PaddleSeg class names, so configs read the same as theirs.
LOSSES: dict[str, type[paddle.nn.Layer]] = {
    "CrossEntropyLoss": CrossEntropyLoss,
    "DiceLoss": DiceLoss,
    "LovaszSoftmaxLoss": LovaszSoftmaxLoss,
}



def _loss_class(name: object) -> type[paddle.nn.Layer]:
    if isinstance(name, str) and name in LOSSES:
        return LOSSES[name]
    close = difflib.get_close_matches(str(name), list(LOSSES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown loss {name!r}; available: {', '.join(LOSSES)}.{hint}")


def _split_term(term: object) -> tuple[Any, Any, Mapping[str, Any]]:
    if isinstance(term, (str, bytes)) or not isinstance(term, Sequence) or len(term) not in (2, 3):
        raise ValueError(
            f"loss term {term!r} must be (name, weight) or (name, weight, kwargs), "
            'e.g. ("DiceLoss", 0.2) or ("DiceLoss", 0.2, {"smooth": 1.0})'
        )
    kwargs = term[2] if len(term) == 3 else {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"loss term {term[0]!r}: kwargs must be a dict, got {kwargs!r}")
    return term[0], term[1], kwargs


def _instantiate(cls: type[paddle.nn.Layer], kwargs: Mapping[str, Any]) -> paddle.nn.Layer:
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{cls.__name__} has no option {key!r}; it accepts {', '.join(accepted)}.{hint}"
            )
    return cls(**kwargs)


def build_loss(terms: Sequence[object], ignore_index: int = 255) -> MixedLoss:
    """A MixedLoss of the named terms; always a MixedLoss, so per-term logging works for one term.

    Each term is `(name, weight)` or `(name, weight, kwargs)`; `ignore_index` is passed to
    every loss unless its kwargs set their own.
    """
    if isinstance(terms, (str, bytes)) or not isinstance(terms, Sequence) or not terms:
        raise ValueError(
            f"loss terms must be a non-empty list of (name, weight), got {terms!r}; "
            f"e.g. {list(PADDLEX_MIXED_LOSS)}"
        )
    built = []
    for term in terms:
        name, weight, kwargs = _split_term(term)
        cls = _loss_class(name)
        weight = check_term_weight(name, weight)
        built.append((_instantiate(cls, {"ignore_index": ignore_index, **kwargs}), weight))
    return MixedLoss(built)
