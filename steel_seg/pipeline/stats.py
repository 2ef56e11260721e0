"""Repeats to conclusions: mean ± std over seeds, and whether a stage's best is beyond noise.

The test is Welch's t-test (two-sided, unequal variances) between the variant with the highest
mean and each other variant: the stage is *resolved* only when every other variant is below the
best with p <= alpha (0.05). A single run per variant, or two variants whose seeds all scored
exactly alike, cannot be tested: such a stage is never resolved, and the verdict says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

ALPHA = 0.05
METHOD = (
    "Welch's t-test (two-sided, unequal variances) between the best mean and each other variant; "
    "not resolved when any p > {alpha:g}, or when a variant has fewer than 2 finished seeds"
)


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof=1; 0 for one value), count and the 95% interval's half-width."""

    mean: float
    std: float
    n: int
    ci95: float

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """'52.3 ± 1.2 (n=3)'; with one value just '52.3 (n=1)'."""
        if self.n == 0:
            return "—"
        mean = f"{self.mean * scale:.{digits}f}"
        if self.n == 1:
            return f"{mean} (n=1)"
        return f"{mean} ± {self.std * scale:.{digits}f} (n={self.n})"


def summarize(values: Sequence[float]) -> Summary:
    """Summary of per-seed values; NaN and None (a run without the metric) are left out."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(clean)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan)
    mean = math.fsum(clean) / n
    if n == 1:
        return Summary(mean, 0.0, 1, math.nan)  # one run has no interval
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in clean) / (n - 1))
    from scipy import stats

    half_width = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return Summary(mean, std, n, half_width)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test, or None when it cannot tell.

    None when either side has fewer than 2 values (no variance estimate), or when both sides have
    zero variance (the statistic is undefined: identical seeds say nothing about noise).
    """
    a = [float(v) for v in a if v is not None and not math.isnan(float(v))]
    b = [float(v) for v in b if v is not None and not math.isnan(float(v))]
    if len(a) < 2 or len(b) < 2:
        return None
    if _flat(a) and _flat(b):
        return None
    import warnings

    from scipy import stats

    with warnings.catch_warnings():  # near-identical seeds: scipy warns of precision loss; p is still usable
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return None if math.isnan(p) else p


def _flat(values: Sequence[float]) -> bool:
    """No spread beyond float rounding (seeds that gave the same score up to ~1e-9)."""
    summary = summarize(values)
    return summary.std <= 1e-9 * max(1.0, abs(summary.mean))


@dataclass(frozen=True)
class Verdict:
    """Which variant of a stage won, and whether the win is beyond noise.

    `ties` are the variants that could not be told apart from the winner (p > alpha, or untestable);
    `p_values` maps every other variant to its p against the winner (None: cannot tell);
    `reason` says in words why the stage is or is not resolved.
    """

    winner: str | None
    resolved: bool
    ties: list[str]
    method: str
    p_values: dict[str, float | None] = field(default_factory=dict)
    reason: str = ""


def stage_verdict(per_variant: dict[str, Sequence[float]], alpha: float = ALPHA) -> Verdict:
    """The variant with the highest mean, and whether every other variant is significantly lower.

    Variants with no values (every seed failed) cannot win; while any such variant exists the stage
    is not resolved either, since its result is unknown.
    """
    method = METHOD.format(alpha=alpha)
    summaries = {name: summarize(values) for name, values in per_variant.items()}
    scored = {name: s for name, s in summaries.items() if s.n > 0}
    missing = sorted(name for name, s in summaries.items() if s.n == 0)
    if not scored:
        why = "no variant has a finished run with the metric" if per_variant else "the stage has no variants"
        return Verdict(None, False, [], method, {}, why)
    winner = max(scored, key=lambda name: (scored[name].mean, name))
    others = [name for name in scored if name != winner]
    p_values = {name: welch_p(per_variant[winner], per_variant[name]) for name in others}
    ties = [name for name in others if p_values[name] is None or p_values[name] > alpha]

    reasons = []
    if not others and not missing:
        return Verdict(winner, True, [], method, {}, "the only variant of the stage")
    single = sorted(name for name in [winner, *others] if scored[name].n < 2)
    if single:
        reasons.append(f"single runs cannot be resolved ({', '.join(single)}: n=1)")
    flat = [name for name in others if p_values[name] is None and name not in single and winner not in single]
    if flat:
        reasons.append(f"cannot tell: {winner} and {', '.join(flat)} have identical scores on every seed")
    close = [name for name in ties if p_values[name] is not None]
    if close:
        reasons.append(
            "within noise of " + winner + ": " + ", ".join(f"{name} (p = {p_values[name]:.2g})" for name in close)
        )
    if missing:
        reasons.append(f"no finished run of {', '.join(missing)}")
    resolved = not ties and not missing
    if resolved:
        worst = max(p_values.values())
        reasons.append(f"{winner} is above every other variant, largest p = {worst:.2g} <= {alpha:g}")
    return Verdict(winner, resolved, ties, method, p_values, "; ".join(reasons))
