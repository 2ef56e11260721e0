"""Losses against independent float64 NumPy references: values, gradients, ignore_index, mixing."""

from __future__ import annotations

import functools
import math

import numpy as np
import paddle
import pytest

from steel_seg.losses import (
    LOSSES,
    PADDLEX_MIXED_LOSS,
    CrossEntropyLoss,
    DiceLoss,
    LovaszSoftmaxLoss,
    MixedLoss,
    build_loss,
)

IGNORE = 255
N, C, H, W = 2, 4, 4, 5
CLASS_WEIGHTS = (0.5, 2.0, 1.0, 3.0)


@pytest.fixture(autouse=True)
def _cpu():
    paddle.set_device("cpu")


# ---------------------------------------------------------------- NumPy references (float64)


def np_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_valid_pixels(logits: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (P, C) and labels (P,) of the non-ignored pixels, batch flattened."""
    probs = np_softmax(logits).transpose(0, 2, 3, 1).reshape(-1, logits.shape[1])
    flat = label.reshape(-1)
    keep = flat != IGNORE
    return probs[keep], flat[keep]


def np_cross_entropy(logits, label, weight=None):
    probs, y = np_valid_pixels(logits, label)
    if y.size == 0:
        return 0.0
    w = np.ones(logits.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    nll = -np.log(probs[np.arange(y.size), y])
    return float((w[y] * nll).sum() / w[y].sum())


def np_cross_entropy_grad(logits, label, weight=None):
    """Analytic d(loss)/d(logits): w[y] * (softmax - onehot) / sum(w[y]) at valid pixels."""
    num_classes = logits.shape[1]
    w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    valid = label != IGNORE
    y = np.where(valid, label, 0)
    onehot = np.eye(num_classes)[y].transpose(0, 3, 1, 2)
    pixel_w = w[y] * valid
    return (np_softmax(logits) - onehot) * (pixel_w / pixel_w.sum())[:, None]


def np_dice(logits, label, smooth=1.0, weight=None):
    probs, y = np_valid_pixels(logits, label)
    num_classes = logits.shape[1]
    dice = np.empty(num_classes)
    for c in range(num_classes):
        p, g = probs[:, c], (y == c).astype(np.float64)
        dice[c] = (2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth)
    w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    return float(1 - (w * dice).sum() / w.sum())


def np_jaccard_of_mistakes(n_true: int, g_sorted: np.ndarray) -> np.ndarray:
    """Jaccard loss |M| / |truth ∪ M| when M = the first k pixels, for k = 0..P (set-function form)."""
    values = [0.0]
    for k in range(1, g_sorted.size + 1):
        false_positives = k - g_sorted[:k].sum()
        values.append(k / (n_true + false_positives))
    return np.array(values)


def np_lovasz(logits, label, classes="present"):
    probs, y = np_valid_pixels(logits, label)
    if y.size == 0:
        return 0.0
    losses = []
    for c in range(logits.shape[1]):
        g = (y == c).astype(np.float64)
        if classes == "present" and g.sum() == 0:
            continue
        errors = np.abs(g - probs[:, c])
        order = np.argsort(-errors, kind="stable")
        jaccard = np_jaccard_of_mistakes(int(g.sum()), g[order])
        # Lovasz extension: sorted errors times the increments of the set function.
        losses.append(float((errors[order] * np.diff(jaccard)).sum()))
    return float(np.mean(losses)) if losses else 0.0


def np_finite_difference(fn, logits: np.ndarray, eps: float) -> np.ndarray:
    grad = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        plus, minus = logits.copy(), logits.copy()
        plus[idx] += eps
        minus[idx] -= eps
        grad[idx] = (fn(plus) - fn(minus)) / (2 * eps)
    return grad


# Each case: a factory for the Paddle loss and the NumPy reference with the same settings.
CASES = {
    "ce": (CrossEntropyLoss, np_cross_entropy),
    "ce_weighted": (
        functools.partial(CrossEntropyLoss, weight=CLASS_WEIGHTS),
        functools.partial(np_cross_entropy, weight=CLASS_WEIGHTS),
    ),
    "dice": (DiceLoss, np_dice),
    "dice_weighted_smooth": (
        functools.partial(DiceLoss, smooth=0.5, weight=CLASS_WEIGHTS),
        functools.partial(np_dice, smooth=0.5, weight=CLASS_WEIGHTS),
    ),
    "lovasz_present": (LovaszSoftmaxLoss, np_lovasz),
    "lovasz_all": (
        functools.partial(LovaszSoftmaxLoss, classes="all"),
        functools.partial(np_lovasz, classes="all"),
    ),
}
case_names = pytest.mark.parametrize("case", list(CASES))


# ---------------------------------------------------------------- helpers


def make_inputs(seed: int, ignore_frac: float = 0.0, absent_class: bool = False):
    """float32 logits (N, C, H, W) and int64 labels (N, H, W); optionally ignore / drop a class."""
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.standard_normal((N, C, H, W))).astype(np.float32)
    high = C - 1 if absent_class else C
    label = rng.integers(0, high, size=(N, H, W)).astype(np.int64)
    label[rng.random((N, H, W)) < ignore_frac] = IGNORE
    return logits, label


def value_and_grad(loss: paddle.nn.Layer, logits: np.ndarray, label: np.ndarray):
    x = paddle.to_tensor(logits, stop_gradient=False)
    value = loss(x, paddle.to_tensor(label))
    value.backward()
    return float(value), x.grad.numpy()


def assert_no_lovasz_ties(logits: np.ndarray, label: np.ndarray, min_gap: float) -> None:
    """Finite differences across a change of sort order are meaningless; make sure there is none."""
    probs, y = np_valid_pixels(logits.astype(np.float64), label)
    for c in range(logits.shape[1]):
        errors = np.sort(np.abs((y == c) - probs[:, c]))
        assert np.diff(errors).min() > min_gap, "pick another seed: near-tied Lovasz errors"


# ---------------------------------------------------------------- values and gradients


@case_names
@pytest.mark.parametrize(
    "seed, ignore_frac, absent_class", [(0, 0.0, False), (1, 0.3, False), (2, 0.3, True)]
)
def test_value_matches_numpy(case, seed, ignore_frac, absent_class):
    factory, reference = CASES[case]
    logits, label = make_inputs(seed, ignore_frac, absent_class)
    got, _ = value_and_grad(factory(), logits, label)
    np.testing.assert_allclose(got, reference(logits.astype(np.float64), label), rtol=1e-5)


@case_names
@pytest.mark.parametrize("seed, absent_class", [(3, False), (4, True)])
def test_gradient_matches_numpy_finite_differences(case, seed, absent_class):
    factory, reference = CASES[case]
    logits, label = make_inputs(seed, ignore_frac=0.25, absent_class=absent_class)
    if case.startswith("lovasz"):
        assert_no_lovasz_ties(logits, label, min_gap=1e-5)
    _, got = value_and_grad(factory(), logits, label)
    fn = functools.partial(reference, label=label)
    # eps far below the smallest gap between Lovasz errors keeps the sort order fixed.
    expected = np_finite_difference(fn, logits.astype(np.float64), eps=1e-6)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weight", [None, CLASS_WEIGHTS])
def test_cross_entropy_gradient_matches_analytic(weight):
    logits, label = make_inputs(5, ignore_frac=0.3)
    _, got = value_and_grad(CrossEntropyLoss(weight=weight), logits, label)
    expected = np_cross_entropy_grad(logits.astype(np.float64), label, weight)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_cross_entropy_zero_class_weight_equals_ignoring_that_class():
    logits, label = make_inputs(6)
    weighted, _ = value_and_grad(CrossEntropyLoss(weight=[0, 1, 1, 1]), logits, label)
    without_background, _ = value_and_grad(
        CrossEntropyLoss(), logits, np.where(label == 0, IGNORE, label)
    )
    np.testing.assert_allclose(weighted, without_background, rtol=1e-6)


def test_lovasz_present_skips_absent_classes_and_all_does_not():
    logits, label = make_inputs(7, absent_class=True)
    present, _ = value_and_grad(LovaszSoftmaxLoss(classes="present"), logits, label)
    every, _ = value_and_grad(LovaszSoftmaxLoss(classes="all"), logits, label)
    assert present != pytest.approx(every)


# ---------------------------------------------------------------- ignore_index


@case_names
def test_ignored_pixels_have_no_effect_and_zero_gradient(case):
    factory, _ = CASES[case]
    logits, label = make_inputs(8, ignore_frac=0.4)
    ignored = np.broadcast_to((label == IGNORE)[:, None], logits.shape)
    assert ignored.any() and not ignored.all()
    before, grad = value_and_grad(factory(), logits, label)
    scrambled = np.where(ignored, 50.0 * np.random.default_rng(9).standard_normal(logits.shape), logits)
    after, _ = value_and_grad(factory(), scrambled.astype(np.float32), label)
    assert after == pytest.approx(before, rel=1e-6)
    assert np.all(grad[ignored] == 0.0)


@case_names
def test_ignoring_pixels_equals_evaluating_on_the_rest(case):
    factory, _ = CASES[case]
    logits, label = make_inputs(10, ignore_frac=0.3)
    keep = label != IGNORE
    # All losses pool pixels over the batch, so the kept pixels can be laid out as (1, C, 1, K).
    subset_logits = logits.transpose(1, 0, 2, 3)[:, keep][None, :, None, :]
    subset_label = label[keep][None, None, :]
    masked, _ = value_and_grad(factory(), logits, label)
    subset, _ = value_and_grad(factory(), np.ascontiguousarray(subset_logits), subset_label)
    assert masked == pytest.approx(subset, rel=1e-5)


@case_names
def test_all_ignored_label_gives_zero_and_finite_gradient(case):
    factory, _ = CASES[case]
    logits, _ = make_inputs(11)
    label = np.full((N, H, W), IGNORE, dtype=np.int64)
    x = paddle.to_tensor(logits, stop_gradient=False)
    value = factory()(x, paddle.to_tensor(label))
    assert not value.stop_gradient, "the zero must stay connected to the graph"
    value.backward()
    assert float(value) == 0.0
    assert np.all(x.grad.numpy() == 0.0)


def test_other_ignore_index():
    logits, label = make_inputs(12, ignore_frac=0.3)
    relabelled = np.where(label == IGNORE, -1, label)
    a, _ = value_and_grad(CrossEntropyLoss(ignore_index=-1), logits, relabelled)
    b, _ = value_and_grad(CrossEntropyLoss(), logits, label)
    assert a == pytest.approx(b, rel=1e-6)


# ---------------------------------------------------------------- input handling


@case_names
def test_inputs_are_not_modified(case):
    factory, _ = CASES[case]
    logits, label = make_inputs(13, ignore_frac=0.3)
    x, y = paddle.to_tensor(logits, stop_gradient=False), paddle.to_tensor(label)
    factory()(x, y).backward()
    np.testing.assert_array_equal(y.numpy(), label)
    np.testing.assert_array_equal(x.numpy(), logits)


@case_names
def test_label_with_channel_axis_and_int32(case):
    factory, _ = CASES[case]
    logits, label = make_inputs(14, ignore_frac=0.2)
    plain, _ = value_and_grad(factory(), logits, label)
    with_axis, _ = value_and_grad(factory(), logits, label[:, None])
    as_int32, _ = value_and_grad(factory(), logits, label.astype(np.int32))
    assert with_axis == plain and as_int32 == plain


def test_bad_inputs_raise_readable_errors():
    logits, label = make_inputs(15)
    loss = CrossEntropyLoss()
    with pytest.raises(ValueError, match="does not match logits"):
        loss(paddle.to_tensor(logits), paddle.to_tensor(label[:, :3]))
    with pytest.raises(ValueError, match="integer class indices"):
        loss(paddle.to_tensor(logits), paddle.to_tensor(label.astype(np.float32)))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        loss(paddle.to_tensor(logits[0]), paddle.to_tensor(label))
    with pytest.raises(ValueError, match="3 class weights for 4 classes"):
        CrossEntropyLoss(weight=[1, 1, 1])(paddle.to_tensor(logits), paddle.to_tensor(label))
    with pytest.raises(ValueError, match="smooth"):
        DiceLoss(smooth=0)
    with pytest.raises(ValueError, match="classes"):
        LovaszSoftmaxLoss(classes="some")
    with pytest.raises(ValueError, match="finite and >= 0"):
        CrossEntropyLoss(weight=[1, -1, 1, 1])


# ---------------------------------------------------------------- mixing and building


@pytest.mark.parametrize("second", [DiceLoss, LovaszSoftmaxLoss])
def test_mixed_loss_is_weighted_sum_and_backward_works(second):
    logits, label = make_inputs(16, ignore_frac=0.2)
    mixed = MixedLoss([(CrossEntropyLoss(), 0.8), (second(), 0.2)])
    total, grad = value_and_grad(mixed, logits, label)
    ce, ce_grad = value_and_grad(CrossEntropyLoss(), logits, label)
    other, other_grad = value_and_grad(second(), logits, label)
    assert total == pytest.approx(0.8 * ce + 0.2 * other, rel=1e-6)
    np.testing.assert_allclose(grad, 0.8 * ce_grad + 0.2 * other_grad, rtol=1e-5, atol=1e-8)
    parts = mixed.last_term_values()
    assert list(parts) == ["CrossEntropyLoss", second.__name__]
    assert parts["CrossEntropyLoss"] == pytest.approx(ce, rel=1e-6)
    assert parts[second.__name__] == pytest.approx(other, rel=1e-6)
    assert all(v.stop_gradient for v in mixed.last_terms.values())


def test_mixed_loss_numbers_repeated_terms():
    mixed = MixedLoss([(DiceLoss(), 0.5), (DiceLoss(smooth=2.0), 0.5)])
    logits, label = make_inputs(17)
    mixed(paddle.to_tensor(logits), paddle.to_tensor(label))
    assert list(mixed.last_term_values()) == ["DiceLoss", "DiceLoss_2"]


def test_build_loss_paddlex_mix():
    loss = build_loss(PADDLEX_MIXED_LOSS)
    assert isinstance(loss, MixedLoss)
    assert [type(t) for t in loss.losses] == [CrossEntropyLoss, LovaszSoftmaxLoss]
    assert loss.weights == [0.8, 0.2]
    assert set(LOSSES) == {"CrossEntropyLoss", "DiceLoss", "LovaszSoftmaxLoss"}


def test_build_loss_passes_kwargs_and_ignore_index():
    loss = build_loss(
        [("CrossEntropyLoss", 1.0, {"weight": CLASS_WEIGHTS}), ("DiceLoss", 0.5, {"smooth": 2.0})],
        ignore_index=0,
    )
    ce, dice = loss.losses
    assert ce.ignore_index == 0 and dice.ignore_index == 0
    assert dice.smooth == 2.0
    np.testing.assert_allclose(ce.class_weight.numpy(), CLASS_WEIGHTS)
    single = build_loss([("DiceLoss", 1.0)])
    assert isinstance(single, MixedLoss) and len(single.losses) == 1


def test_build_loss_unknown_name_suggests_nearest():
    with pytest.raises(ValueError, match="Did you mean 'LovaszSoftmaxLoss'") as info:
        build_loss([("LovaszSoftmax", 1.0)])
    assert "CrossEntropyLoss, DiceLoss, LovaszSoftmaxLoss" in str(info.value)
    with pytest.raises(ValueError, match="Did you mean 'smooth'"):
        build_loss([("DiceLoss", 1.0, {"smoth": 1.0})])


@pytest.mark.parametrize("weight", [0, -0.2, math.nan, math.inf, "0.5", True, None])
def test_build_loss_rejects_bad_weights(weight):
    with pytest.raises(ValueError, match="DiceLoss"):
        build_loss([("CrossEntropyLoss", 0.8), ("DiceLoss", weight)])


@pytest.mark.parametrize("terms", [[], "CrossEntropyLoss", [("CrossEntropyLoss",)], [("DiceLoss", 1, 2)]])
def test_build_loss_rejects_malformed_terms(terms):
    with pytest.raises(ValueError):
        build_loss(terms)
