"""TTA views, merges and the batching runner, checked against computations written out by hand."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
import yaml

from steel_seg.config import load_experiment
from steel_seg.data.loader import Batch
from steel_seg.deploy.postprocess import softmax
from steel_seg.deploy.tta import IDENTITY, TTAPlan, ViewRunner, parse_view, resolve
from steel_seg.evaluation import evaluate
from steel_seg.models import build_model
from steel_seg.tta import dygraph_forward, plan_from_eval


class Asymmetric(paddle.nn.Layer):
    """Logits that depend on where a pixel is, so an output left flipped or unscaled is wrong."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        h, w = x.shape[2], x.shape[3]
        cols = paddle.arange(w, dtype="float32").reshape([1, 1, 1, w]) / w
        rows = paddle.arange(h, dtype="float32").reshape([1, 1, h, 1]) / h
        return paddle.concat([x[:, :1] * 2 + cols * 3, x[:, 1:2] - rows * 2, x[:, 2:3] * 4 * cols * rows], axis=1)


def smooth_batch(n=2, h=8, w=12, seed=0) -> np.ndarray:
    """Normalised images in [-1, 1] with structure in both directions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / 3 + k) * np.cos(yy / 2 - k) for k in range(3)])
    return np.clip(base[None] * 0.8 + rng.normal(0, 0.1, (n, 3, h, w)), -1, 1).astype(np.float32)


def model_probs(model, x: np.ndarray) -> np.ndarray:
    return softmax(model(paddle.to_tensor(np.ascontiguousarray(x))).numpy())


def blur3_by_hand(x: np.ndarray) -> np.ndarray:
    """OpenCV's 3x3 Gaussian with sigma 0 is [1/4, 1/2, 1/4] each way, border reflect-101."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    k = np.array([0.25, 0.5, 0.25], np.float32)
    rows = sum(k[i] * padded[:, :, i:i + x.shape[2], :] for i in range(3))
    return sum(k[j] * rows[:, :, :, j:j + x.shape[3]] for j in range(3))


def half_by_hand(x: np.ndarray) -> np.ndarray:
    """Bilinear resize by exactly 0.5 samples between pixel pairs: the mean of each 2x2 block."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def double_by_hand(x: np.ndarray) -> np.ndarray:
    """Bilinear x2 with half-pixel centres: output 2k samples k - 1/4, 2k + 1 samples k + 1/4."""
    def along(a, axis):
        a = np.moveaxis(a, axis, -1)
        prev = np.concatenate([a[..., :1], a[..., :-1]], axis=-1)  # clamped at the border
        nxt = np.concatenate([a[..., 1:], a[..., -1:]], axis=-1)
        out = np.empty(a.shape[:-1] + (2 * a.shape[-1],), np.float32)
        out[..., 0::2] = 0.75 * a + 0.25 * prev
        out[..., 1::2] = 0.75 * a + 0.25 * nxt
        return np.moveaxis(out, -1, axis)
    return along(along(x, 2), 3)


def unflip_cols(p):
    return p[..., list(reversed(range(p.shape[-1])))]


def unflip_rows(p):
    return p[:, :, list(reversed(range(p.shape[2]))), :]


def to_pixels(x):
    return x * 0.5 + 0.5


def from_pixels(p):
    return (p - 0.5) / 0.5


BY_HAND = {
    "hflip": lambda m, x: unflip_cols(model_probs(m, unflip_cols(x))),
    "vflip": lambda m, x: unflip_rows(model_probs(m, unflip_rows(x))),
    "hvflip": lambda m, x: unflip_rows(unflip_cols(model_probs(m, unflip_rows(unflip_cols(x))))),
    "hflip+blur": lambda m, x: unflip_cols(model_probs(m, blur3_by_hand(unflip_cols(x)))),
    "blur+vflip": lambda m, x: unflip_rows(model_probs(m, unflip_rows(blur3_by_hand(x)))),
    "scale:0.5": lambda m, x: double_by_hand(model_probs(m, half_by_hand(x))),
    "brightness:+0.1": lambda m, x: model_probs(m, from_pixels(np.clip(to_pixels(x) + 0.1, 0, 1))),
    "contrast:1.5": lambda m, x: model_probs(m, from_pixels(np.clip(
        to_pixels(x).mean(axis=(1, 2, 3), keepdims=True) * -0.5 + 1.5 * to_pixels(x), 0, 1))),
}


@pytest.mark.parametrize("name", list(BY_HAND))
def test_each_view_is_undone_as_computed_by_hand(name):
    model = Asymmetric()
    x = smooth_batch()
    runner = ViewRunner(dygraph_forward(model))
    view = parse_view(name)
    (got,) = runner.outputs(x, [view], resolve([]).norm)
    expected = BY_HAND[name](model, x)
    assert got.shape == expected.shape == (2, 3, 8, 12)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    # The model is not symmetric: without the undo (or with the plain output) the test would fail.
    assert not np.allclose(got, model_probs(model, x), atol=1e-3)


def test_scale_view_runs_the_model_at_the_scaled_size_and_returns_to_the_input_size():
    model = Asymmetric()
    x = smooth_batch(h=16, w=24)
    (out,) = ViewRunner(dygraph_forward(model)).outputs(x, [parse_view("scale:1.5")], resolve([]).norm)
    assert model.shapes == [(2, 3, 24, 36)] and out.shape == (2, 3, 16, 24)
    # A model whose logits are a per-pixel function of a smooth input is nearly scale-equivariant.
    ramp = np.broadcast_to(np.linspace(-1, 1, 24, dtype=np.float32), (1, 3, 16, 24)).copy()
    pixelwise = lambda b: np.concatenate([b[:, :1] * 3, -b[:, 1:2], b[:, 2:3] * 0], axis=1)  # noqa: E731
    (scaled,) = ViewRunner(pixelwise).outputs(ramp, [parse_view("scale:1.5")], resolve([]).norm)
    np.testing.assert_allclose(scaled[..., 2:-2], softmax(pixelwise(ramp))[..., 2:-2], atol=2e-3)


def test_blur_view_is_a_gaussian_of_the_given_kernel_and_sigma():
    impulse = np.full((1, 3, 9, 9), -1.0, np.float32)
    impulse[:, :, 4, 4] = 1.0  # one white pixel on black, normalised
    (blurred, _) = parse_view("blur:5:1.0").augment(impulse, resolve([]).norm)
    g = np.exp(-((np.arange(5) - 2) ** 2) / 2.0)
    g /= g.sum()
    pixels = to_pixels(blurred[0, 0, 2:7, 2:7])
    np.testing.assert_allclose(pixels, np.outer(g, g), atol=1e-6)
    assert np.allclose(blurred[:, :, 0, 0], -1.0)  # far from the impulse nothing changes
    assert parse_view("blur").name == "blur:3" and parse_view("blur:5:1.5").name == "blur:5:1.5"
    # Blurring the normalised input is blurring the image, then normalising.
    x = smooth_batch()
    np.testing.assert_allclose(parse_view("blur").augment(x, resolve([]).norm)[0], from_pixels(blur3_by_hand(to_pixels(x))), atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    ("blur:4", "odd whole number"), ("blur:3:1:2", "blur:K or blur:K:SIGMA"), ("scale:0", r"in \[0.25, 4\]"),
    ("scale", "scale:FACTOR"), ("hflp", "Did you mean `hflip`"), ("hflip+", "empty part"),
    ("brightness:x", "must be a number"), ("hflip:2", "takes no parameters"),
])
def test_bad_view_names_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_view(bad)


def test_weighted_half_half_is_the_seeds_formula_exactly_and_is_expressible_in_yaml(tmp_path):
    model = Asymmetric()
    x = smooth_batch()
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump({"eval": {"tta": ["blur"], "tta_merge": "weighted", "tta_weights": [0.5, 0.5]}}))
    plan = plan_from_eval(load_experiment(path).eval)
    assert plan.extra_views == ["blur:3"] and plan.merge == "weighted" and plan.weights == (0.5, 0.5)
    merged = ViewRunner(dygraph_forward(model)).probs(x, plan)
    original = model_probs(model, x)
    blur = ViewRunner(dygraph_forward(model)).outputs(x, [parse_view("blur")], plan.norm)[0]
    np.testing.assert_allclose(blur, model_probs(model, blur3_by_hand(x)), atol=1e-6)
    assert np.array_equal(merged, 0.5 * original + 0.5 * blur)  # bit for bit
    # Other weights: a weighted mean (normalised by the sum).
    uneven = ViewRunner(dygraph_forward(model)).probs(x, resolve(["blur"], "weighted", [3, 1]))
    np.testing.assert_allclose(uneven, (3 * original + blur) / 4, atol=1e-6)


def test_merges_by_hand():
    model = Asymmetric()
    x = smooth_batch()
    runner = ViewRunner(dygraph_forward(model))
    p0, p1 = model_probs(model, x), BY_HAND["hflip"](model, x)
    logits = model(paddle.to_tensor(x)).numpy()
    flipped_logits = unflip_cols(model(paddle.to_tensor(unflip_cols(x).copy())).numpy())
    np.testing.assert_allclose(runner.probs(x, resolve(["hflip"])), (p0 + p1) / 2, atol=1e-6)
    np.testing.assert_allclose(runner.probs(x, resolve(["hflip"], "max")), np.maximum(p0, p1), atol=1e-6)
    g = np.sqrt(p0 * p1)
    np.testing.assert_allclose(runner.probs(x, resolve(["hflip"], "gmean")), g / g.sum(axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(runner.probs(x, resolve(["hflip"], "logits_mean")), softmax((logits + flipped_logits) / 2), atol=1e-6)


@pytest.mark.parametrize("merge, weights", [("mean", None), ("weighted", [0.5, 0.5]), ("max", None), ("logits_mean", None)])
def test_identity_tta_equals_plain_evaluation_bit_for_bit(merge, weights):
    paddle.seed(0)
    model = build_model("UNet", 5, None)
    rng = np.random.default_rng(0)
    loader = [Batch(smooth_batch(2, 32, 64, seed=i), rng.integers(0, 5, (2, 32, 64)), [2 * i, 2 * i + 1]) for i in range(2)]
    twice = TTAPlan((IDENTITY, IDENTITY), merge, None if weights is None else tuple(weights))
    plain = evaluate(model, loader, 5, progress=False)
    tta = evaluate(model, loader, 5, tta=twice, progress=False)
    assert tta.forward_passes == 2 and plain.forward_passes == 2  # the two copies went through as one batch
    assert tta.scores["confusion_matrix"] == plain.scores["confusion_matrix"]
    assert tta.scores["miou"] == plain.scores["miou"]
    runner = ViewRunner(dygraph_forward(model))
    with paddle.no_grad():
        model.eval()
        assert np.array_equal(runner.probs(loader[0].images, twice), runner.probs(loader[0].images, TTAPlan()))
    named = evaluate(model, loader, 5, tta=resolve(["identity"]), progress=False)
    assert resolve(["identity"]).is_plain and named.scores["confusion_matrix"] == plain.scores["confusion_matrix"]


def test_views_of_a_batch_share_one_forward_pass_per_input_size():
    calls = []

    def forward(batch):
        calls.append(batch.shape)
        return np.concatenate([batch[:, :2], batch[:, :1] * 0], axis=1)

    x = smooth_batch(n=3)
    plan = resolve(["hflip", "vflip", "scale:2", "hflip+scale:2"])
    runner = ViewRunner(forward)
    batched = runner.probs(x, plan)
    assert sorted(calls) == [(6, 3, 16, 24), (9, 3, 8, 12)]  # one pass per input size
    calls.clear()
    per_view = ViewRunner(forward, batched=False).probs(x, plan)
    assert len(calls) == 5
    np.testing.assert_allclose(batched, per_view, atol=1e-7)


def test_running_out_of_memory_falls_back_to_one_pass_per_view(caplog):
    def forward(batch):
        if len(batch) > 2:
            raise MemoryError("ResourceExhaustedError: Out of memory error on GPU 0")
        return batch * 2

    x = smooth_batch(n=2)
    plan = resolve(["hflip", "vflip"])
    runner = ViewRunner(forward)
    first = runner.probs(x, plan)
    assert not runner.batched and "one pass per view from now on" in caplog.text
    np.testing.assert_allclose(first, ViewRunner(lambda b: b * 2).probs(x, plan), atol=1e-7)

    def broken(batch):
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):  # other errors are not hidden
        ViewRunner(broken).probs(x, plan)


def test_plans_check_merges_and_weights():
    with pytest.raises(ValueError, match="needs weights"):
        resolve(["blur"], "weighted")
    with pytest.raises(ValueError, match=r"2 view\(s\) \(the original, blur:3\)"):
        resolve(["blur"], "weighted", [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="are for merge `weighted`"):
        resolve(["blur"], "mean", [0.5, 0.5])
    with pytest.raises(ValueError, match="Did you mean `gmean`"):
        resolve(["blur"], "gmaen")
    plan = resolve(["hflip,blur", "hflip", "hflip+blur"])
    assert plan.extra_views == ["hflip", "blur:3", "hflip+blur:3"]
    assert plan.as_spec() == {"views": ["hflip", "blur:3", "hflip+blur:3"], "merge": "mean"}
