"""Segmentation losses we own (CE, Dice, Lovasz-Softmax, weighted mixes) and their registry.

paddleseg 2.8's CE breaks under Paddle 3 type promotion and its Dice edits the label in
place, so the losses in our ablations are written and tested here.
"""

from steel_seg.losses.build import LOSSES, PADDLEX_MIXED_LOSS, build_loss
from steel_seg.losses.cross_entropy import CrossEntropyLoss, cross_entropy
from steel_seg.losses.dice import DiceLoss, dice_loss, per_class_dice
from steel_seg.losses.lovasz import LovaszSoftmaxLoss, lovasz_grad, lovasz_softmax
from steel_seg.losses.mixed import MixedLoss

__all__ = [
    "LOSSES",
    "PADDLEX_MIXED_LOSS",
    "build_loss",
    "CrossEntropyLoss",
    "DiceLoss",
    "LovaszSoftmaxLoss",
    "MixedLoss",
    "cross_entropy",
    "dice_loss",
    "per_class_dice",
    "lovasz_softmax",
    "lovasz_grad",
]
