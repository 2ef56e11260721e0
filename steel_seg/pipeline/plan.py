"""The plan of a staged ablation study: stages, variants, `best_of` inheritance and seeds, read
from pipeline.yaml and checked end to end before the first run starts.

Nothing here trains, touches MLflow or reads data: a plan is resolved configs and references,
so a typo in the last stage fails in a second, not after hours of training.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml

from steel_seg.config import ConfigError, ExperimentConfig, dump_config, validate_experiment
from steel_seg.config.loader import RawConfig, apply_overrides, load_yaml_tree

DEFAULT_METRIC = "final_val_miou"

TOP_KEYS = ("name", "metric", "repeats", "seeds", "set", "resources", "profiles", "stages", "conclusions")
PROFILE_KEYS = ("repeats", "seeds", "set")
STAGE_KEYS = ("name", "config", "from", "evaluate_only", "resources", "variants")
VARIANT_KEYS = ("config", "from", "set", "reference_miou")
CONCLUSION_KEYS = ("claim", "better", "worse")
# What one variant's task asks a cluster for (`--executor ray`): CPUs, GPUs, memory.
RESOURCE_KEYS = ("cpus", "gpus", "memory_gb")
DEFAULT_RESOURCES = {"cpus": 1.0, "gpus": 0.0}

# Stage and variant names end up in `stage.variant` references, run names and folder names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
BEST_OF_PATTERN = re.compile(r"^best_of\((.*)\)$")

# An evaluate-only variant re-scores an earlier run's model: it may change evaluation only.
EVALUATE_ONLY_SECTIONS = ("eval.", "tracking.")


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Reference:
    """`best_of(S1, S2)`: the winner over those stages' variants; `S.V`: one fixed variant."""

    kind: Literal["best_of", "variant"]
    stages: tuple[str, ...]
    variant: str | None = None

    @property
    def text(self) -> str:
        return f"best_of({', '.join(self.stages)})" if self.kind == "best_of" else f"{self.stages[0]}.{self.variant}"

    def __str__(self) -> str:
        return self.text


def parse_reference(text: Any) -> Reference:
    """`best_of(augment)`, `best_of(baselines, augment)` or `loss.ce_dice`; ValueError otherwise."""
    expected = "expected best_of(STAGE[, STAGE...]) or STAGE.VARIANT"
    if not isinstance(text, str):
        raise ValueError(f"{expected}, got {text!r}")
    text = text.strip()
    match = BEST_OF_PATTERN.match(text)
    if match:
        stages = tuple(s.strip() for s in match.group(1).split(","))
        if not all(NAME_PATTERN.match(s) for s in stages):
            raise ValueError(f"`{text}`: {expected}")
        return Reference("best_of", stages)
    stage, dot, variant = text.partition(".")
    if dot and NAME_PATTERN.match(stage) and NAME_PATTERN.match(variant):
        return Reference("variant", (stage,), variant)
    hint = f"; did you mean `best_of({text})`?" if NAME_PATTERN.match(text) else ""
    raise ValueError(f"`{text}`: {expected}{hint}")


@dataclass
class Variant:
    """One experiment of a stage: a base (a config file, or an earlier variant) plus `set`."""

    stage: str
    name: str
    config: Path | None
    """The base experiment file (the variant's own, else its stage's) when it has no `from`."""
    sets: list[str]
    from_: Reference | None
    """The variant's base run: its own `from`, else its stage's (unless it names a `config`)."""
    reference_miou: float | None = None
    """The seed study's published mIoU (a fraction), for the reproduction report."""
    origin: str = ""
    """`file:line` where the variant is written."""
    set_origins: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.stage}.{self.name}"


@dataclass
class Stage:
    name: str
    index: int
    variants: list[Variant]
    from_: Reference | None = None
    """The stage-level `from`; each variant's own base is `Variant.from_` / `Variant.config`."""
    config: Path | None = None
    evaluate_only: bool = False
    """No training: each variant re-evaluates the model of its `from` run (same seed)."""
    resources: dict[str, float] = field(default_factory=dict)
    """What each of its variants' tasks requests on a cluster, over the pipeline's `resources`."""
    origin: str = ""

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"stage `{self.name}` has no variant `{name}`{_suggest(name, [v.name for v in self.variants])}")


@dataclass
class Conclusion:
    """A claim of the seed study: `better` beats `worse` (each a reference)."""

    claim: str
    better: Reference
    worse: Reference
    origin: str = ""


@dataclass
class Pipeline:
    name: str
    metric: str
    """The metric that picks a stage's winner (higher is better), e.g. final_val_miou."""
    seeds: list[int]
    """Every variant runs once per seed; seed s sets train.seed=s."""
    stages: list[Stage]
    conclusions: list[Conclusion]
    path: Path | None = None
    sets: list[str] = field(default_factory=list)
    """`set` for every variant: the file's, then the profile's."""
    set_origins: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    """Command-line `--set`: applied after each variant's own `set`, so they win."""
    profile: str | None = None
    resources: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    """What each variant's task requests on a cluster (cpus, gpus, memory_gb)."""
    _raw_configs: dict[Path, RawConfig] = field(default_factory=dict, repr=False, compare=False)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage `{name}`{_suggest(name, [s.name for s in self.stages])}")

    def variant(self, key: str) -> Variant:
        """The variant named `STAGE.VARIANT`."""
        stage, _, name = key.partition(".")
        return self.stage(stage).variant(name)

    def variants(self) -> Iterator[Variant]:
        for stage in self.stages:
            yield from stage.variants

    def stage_resources(self, stage: Stage) -> dict[str, float]:
        return {**self.resources, **stage.resources}

    def raw_config(self, path: Path) -> RawConfig:
        """An experiment file with its `_base_` files merged, read once per plan."""
        if path not in self._raw_configs:
            self._raw_configs[path] = load_yaml_tree(path)
        return self._raw_configs[path]


def _suggest(word: str, valid: list[str], what: str = "") -> str:
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; {what or 'valid'}: {', '.join(valid)}" if valid else ""


# ---------------------------------------------------------------------------------------------
# Reading pipeline.yaml


def _read_with_lines(path: Path) -> tuple[Any, dict[tuple, int]]:
    """The YAML data and the line of every mapping key and list item (paths use list indices)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"pipeline file not found: {path}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {getattr(exc, 'problem', None) or exc}") from None
    lines: dict[tuple, int] = {}

    def convert(node: yaml.Node, at: tuple) -> Any:
        lines.setdefault(at, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = yaml.safe_load(yaml.serialize(key_node))
                if key in out:
                    raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: duplicate key `{key}`")
                lines[at + (key,)] = key_node.start_mark.line + 1
                out[key] = convert(value_node, at + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [convert(item, at + (i,)) for i, item in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))

    return (None if root is None else convert(root, ())), lines


class _Reader:
    """Turns pipeline.yaml data into the plan, collecting every problem with file:line."""

    def __init__(self, path: Path, lines: dict[tuple, int]):
        self.path, self.lines = path, lines
        self.problems: list[str] = []

    def where(self, at: tuple) -> str:
        for n in range(len(at), -1, -1):
            if at[:n] in self.lines:
                return f"{self.path}:{self.lines[at[:n]]}"
        return str(self.path)

    def problem(self, at: tuple, label: str, message: str) -> None:
        self.problems.append(f"{label} ({self.where(at)}): {message}")

    def mapping(self, value: Any, at: tuple, label: str, valid: tuple[str, ...]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(at, label, f"expected a mapping with keys {', '.join(valid)}, got {value!r}")
            return {}
        for key in value:
            if key not in valid:
                self.problem(at + (key,), label, f"unknown key `{key}`{_suggest(str(key), list(valid), 'valid keys')}")
        return value

    def sets(self, value: Any, at: tuple, label: str) -> tuple[list[str], list[str]]:
        """A `set` list of KEY=VALUE strings, and where each was written."""
        if value is None:
            return [], []
        if not isinstance(value, list):
            self.problem(at, label, f"`set` must be a list of KEY=VALUE strings, got {value!r}")
            return [], []
        items, origins = [], []
        for i, item in enumerate(value):
            if not isinstance(item, str) or "=" not in item or not item.partition("=")[0].strip():
                hint = " (quote items whose value is a list or mapping: \"eval.tta=[hflip]\")" if isinstance(item, dict) else ""
                self.problem(at + (i,), label, f"set[{i}] must be KEY=VALUE, e.g. train.epochs=3, got {item!r}{hint}")
                continue
            items.append(item)
            origins.append(f"{self.where(at + (i,))} set `{item}`")
        return items, origins

    def seeds(self, data: dict, at: tuple, label: str) -> list[int] | None:
        """`seeds: [...]` or `repeats: N` (seeds 0..N-1); None when neither is given."""
        if "seeds" in data and "repeats" in data:
            self.problem(at + ("seeds",), label, "give `repeats: N` or `seeds: [...]`, not both")
            return None
        if "repeats" in data:
            repeats = data["repeats"]
            if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
                self.problem(at + ("repeats",), label, f"repeats must be an integer >= 1, got {repeats!r}")
                return None
            return list(range(repeats))
        if "seeds" in data:
            seeds = data["seeds"]
            if (not isinstance(seeds, list) or not seeds
                    or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
                self.problem(at + ("seeds",), label, f"seeds must be a non-empty list of integers, got {seeds!r}")
                return None
            if len(set(seeds)) != len(seeds):
                self.problem(at + ("seeds",), label, f"seeds repeat a value: {seeds}")
                return None
            return list(seeds)
        return None

    def resources(self, value: Any, at: tuple, label: str) -> dict[str, float]:
        """`resources: {cpus: 2, gpus: 1, memory_gb: 8}`: numbers >= 0 (a fraction of a GPU is fine)."""
        data = self.mapping(value, at, label, RESOURCE_KEYS)
        out = {}
        for key in RESOURCE_KEYS:
            if key not in data:
                continue
            number = data[key]
            if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
                self.problem(at + (key,), label, f"resources.{key} must be a number >= 0, got {number!r}")
                continue
            out[key] = float(number)
        return out

    def reference(self, value: Any, at: tuple, label: str) -> Reference | None:
        try:
            return parse_reference(value)
        except ValueError as exc:
            self.problem(at, label, f"`{at[-1]}`: {exc}")
            return None

    def config_file(self, value: Any, at: tuple, label: str) -> Path | None:
        if not isinstance(value, str) or not value.strip():
            self.problem(at, label, f"`config` must be a path to an experiment file, got {value!r}")
            return None
        file = Path(value) if Path(value).is_absolute() else self.path.parent / value
        if not file.is_file():
            siblings = sorted(p.name for p in file.parent.glob("*.y*ml")) if file.parent.is_dir() else []
            close = difflib.get_close_matches(file.name, siblings, n=1, cutoff=0.6)
            hint = f"; did you mean `{Path(value).parent / close[0]}`?" if close else ""
            self.problem(at, label, f"config file not found: {value} (looked at {file}){hint}")
            return None
        return file

    def stage(self, data: Any, index: int) -> Stage:
        at = ("stages", index)
        name = data.get("name") if isinstance(data, dict) else None
        label = f"stage `{name}`" if isinstance(name, str) else f"stages[{index}]"
        data = self.mapping(data, at, label, STAGE_KEYS)
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            self.problem(at + ("name",), label, f"every stage needs a `name` of letters, digits, _ or - (got {name!r})")
            name = f"stages[{index}]"
        stage = Stage(name, index, [], origin=self.where(at))
        base_broken = any(key not in STAGE_KEYS for key in data)  # a misspelt `from` or `config`
        if "from" in data and "config" in data:
            self.problem(at + ("from",), label, "give `from` (an earlier variant) or `config` (a file), not both")
            base_broken = True
        elif "from" in data:
            stage.from_ = self.reference(data["from"], at + ("from",), label)
            base_broken |= stage.from_ is None
        elif "config" in data:
            stage.config = self.config_file(data["config"], at + ("config",), label)
            base_broken |= stage.config is None
        evaluate_only = data.get("evaluate_only", False)
        if not isinstance(evaluate_only, bool):
            self.problem(at + ("evaluate_only",), label, f"evaluate_only must be true or false, got {evaluate_only!r}")
        stage.evaluate_only = evaluate_only is True
        stage.resources = self.resources(data.get("resources"), at + ("resources",), label)
        variants = data.get("variants")
        if variants is not None and not isinstance(variants, dict):
            self.problem(at + ("variants",), label, "`variants` must be a mapping of variant name to settings")
            variants = None
        for variant_name, spec in (variants or {}).items():
            stage.variants.append(self.variant(stage, str(variant_name), spec, at + ("variants", variant_name), base_broken))
        return stage

    def variant(self, stage: Stage, name: str, data: Any, at: tuple, stage_base_broken: bool) -> Variant:
        label = f"stage `{stage.name}` variant `{name}`"
        if not NAME_PATTERN.match(name):
            self.problem(at, label, "variant names are letters, digits, _ or -")
        data = self.mapping(data, at, label, VARIANT_KEYS)
        sets, set_origins = self.sets(data.get("set"), at + ("set",), label)
        variant = Variant(stage.name, name, None, sets, None, origin=self.where(at), set_origins=set_origins)
        reference_miou = data.get("reference_miou")
        if reference_miou is not None:
            if isinstance(reference_miou, bool) or not isinstance(reference_miou, (int, float)) or not 0 <= reference_miou <= 1:
                self.problem(at + ("reference_miou",), label,
                             f"reference_miou is a fraction in [0, 1] (0.486 for 48.6%), got {reference_miou!r}")
            else:
                variant.reference_miou = float(reference_miou)
        if "from" in data and "config" in data:
            self.problem(at + ("from",), label, "give `from` (an earlier variant) or `config` (a file), not both")
        elif "from" in data:
            variant.from_ = self.reference(data["from"], at + ("from",), label)
        elif "config" in data:
            variant.config = self.config_file(data["config"], at + ("config",), label)
        elif stage.from_ is not None or stage.config is not None:
            variant.from_, variant.config = stage.from_, stage.config
        elif not stage_base_broken and all(key in VARIANT_KEYS for key in data):
            self.problem(at, label, "no base experiment: give `config: FILE` or `from: best_of(STAGE)` "
                                    "(or `from: STAGE.VARIANT`) on the variant or its stage")
        return variant

    def conclusion(self, data: Any, index: int) -> Conclusion | None:
        at = ("conclusions", index)
        label = f"conclusions[{index}]"
        data = self.mapping(data, at, label, CONCLUSION_KEYS)
        missing = [k for k in CONCLUSION_KEYS if k not in data]
        if missing:
            self.problem(at, label, f"missing {', '.join(missing)}: write {{claim: TEXT, better: REF, worse: REF}}")
            return None
        better = self.reference(data["better"], at + ("better",), label)
        worse = self.reference(data["worse"], at + ("worse",), label)
        if better is None or worse is None:
            return None
        return Conclusion(str(data["claim"]), better, worse, self.where(at))


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = (), profile: str | None = None) -> Pipeline:
    """Read pipeline.yaml (with a profile merged in) and check its structure and references.

    `overrides` are the command line's `--set` for every variant. Every problem found is in
    one ConfigError naming file, line, stage, variant and key. Resolving the variants'
    configs is `check_pipeline`'s job.
    """
    path = Path(path)
    data, lines = _read_with_lines(path)
    reader = _Reader(path, lines)
    data = reader.mapping(data, (), "top level", TOP_KEYS)

    sets, set_origins = reader.sets(data.get("set"), ("set",), "top level")
    seeds = reader.seeds(data, (), "top level")
    profiles = data.get("profiles") or {}
    if not isinstance(profiles, dict):
        reader.problem(("profiles",), "top level", "`profiles` must be a mapping of profile name to settings")
        profiles = {}
    for name, spec in profiles.items():
        reader.mapping(spec, ("profiles", name), f"profile `{name}`", PROFILE_KEYS)
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(map(str, profiles)) or "none"
            raise ConfigError(f"{path}: no profile `{profile}`{_suggest(profile, list(map(str, profiles)))} (profiles: {known})")
        spec = profiles[profile] if isinstance(profiles[profile], dict) else {}
        more, more_origins = reader.sets(spec.get("set"), ("profiles", profile, "set"), f"profile `{profile}`")
        sets, set_origins = sets + more, set_origins + more_origins
        seeds = reader.seeds(spec, ("profiles", profile), f"profile `{profile}`") or seeds

    metric = data.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or not re.match(r"^[A-Za-z0-9_./-]+$", metric):
        reader.problem(("metric",), "top level", f"metric must be a metric name such as final_val_miou, got {metric!r}")
        metric = DEFAULT_METRIC
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        reader.problem(("name",), "top level", f"name must be a non-empty string, got {name!r}")
        name = path.stem

    stages_data = data.get("stages")
    if not isinstance(stages_data, list) or not stages_data:
        reader.problem(("stages",), "top level", "`stages` must be a non-empty list of {name, variants, ...}")
        stages_data = []
    stages = [reader.stage(spec, i) for i, spec in enumerate(stages_data)]
    conclusions_data = data.get("conclusions") or []
    if not isinstance(conclusions_data, list):
        reader.problem(("conclusions",), "top level", "`conclusions` must be a list of {claim, better, worse}")
        conclusions_data = []
    conclusions = [c for i, spec in enumerate(conclusions_data) if (c := reader.conclusion(spec, i)) is not None]

    pipeline = Pipeline(
        name=name, metric=metric, seeds=seeds or [0], stages=stages,
        conclusions=conclusions, path=path, sets=sets, set_origins=set_origins,
        overrides=list(overrides), profile=profile,
        resources={**DEFAULT_RESOURCES, **reader.resources(data.get("resources"), ("resources",), "top level")},
    )
    problems = reader.problems + plan_problems(pipeline)
    if problems:
        raise ConfigError(_problem_list(f"invalid pipeline {path}", problems))
    return pipeline


def _problem_list(title: str, problems: list[str]) -> str:
    lines = [f"{title}:"]
    for problem in problems:
        first, *rest = problem.splitlines()
        lines.append(f"  - {first}")
        lines.extend(f"    {line}" for line in rest)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# References: what builds on what


def referenced_variants(pipeline: Pipeline, reference: Reference) -> list[Variant]:
    """The variants a reference may stand for: every variant of a best_of's stages, or one."""
    if reference.kind == "best_of":
        return [v for name in reference.stages for v in pipeline.stage(name).variants]
    return [pipeline.stage(reference.stages[0]).variant(str(reference.variant))]


def _reference_problems(pipeline: Pipeline, reference: Reference, before: int | None) -> list[str]:
    """Why a reference is dangling, or (with `before`) names a stage at or after that index."""
    names = [s.name for s in pipeline.stages]
    problems = []
    for name in reference.stages:
        if name not in names:
            problems.append(f"`{reference}` names no stage `{name}`{_suggest(name, names, 'stages')}")
            continue
        target = pipeline.stage(name)
        if before is not None and target.index >= before:
            relation = "is this stage" if target.index == before else "comes later"
            problems.append(f"`{reference}`: stage `{name}` {relation}; a stage can only build on earlier stages")
        elif before is not None and target.evaluate_only:
            problems.append(f"`{reference}`: stage `{name}` is evaluate-only and trains no model to build on")
        if reference.kind == "variant" and not any(v.name == reference.variant for v in target.variants):
            valid = [v.name for v in target.variants]
            problems.append(f"`{reference}`: stage `{name}` has no variant `{reference.variant}`"
                            f"{_suggest(str(reference.variant), valid, 'variants')}")
    return problems


def plan_problems(pipeline: Pipeline) -> list[str]:
    """Everything wrong with the plan's shape: names, references, evaluate-only stages."""
    problems = []
    seen: dict[str, Stage] = {}
    for stage in pipeline.stages:
        label = f"stage `{stage.name}` ({stage.origin})" if stage.origin else f"stage `{stage.name}`"
        if stage.name in seen:
            problems.append(f"{label}: duplicate stage name (also stage {seen[stage.name].index + 1})")
        seen.setdefault(stage.name, stage)
        if not stage.variants:
            problems.append(f"{label}: no variants; give at least one under `variants:`")
        if stage.from_ is not None:
            problems += [f"{label}: from {p}" for p in _reference_problems(pipeline, stage.from_, stage.index)]
        for variant in stage.variants:
            vlabel = f"stage `{stage.name}` variant `{variant.name}` ({variant.origin})"
            if variant.from_ is not None and variant.from_ is not stage.from_:
                problems += [f"{vlabel}: from {p}" for p in _reference_problems(pipeline, variant.from_, stage.index)]
            if stage.evaluate_only:
                if variant.from_ is None:
                    problems.append(f"{vlabel}: an evaluate-only stage re-evaluates an earlier run's model; "
                                    "give `from:` (e.g. best_of(STAGE)), not `config:`")
                for item in variant.sets:
                    if not item.startswith(EVALUATE_ONLY_SECTIONS):
                        problems.append(f"{vlabel}: set `{item}`: an evaluate-only variant may change only "
                                        f"{' / '.join(s + '*' for s in EVALUATE_ONLY_SECTIONS)}; the model is not retrained")
    for conclusion in pipeline.conclusions:
        label = f"conclusion `{conclusion.claim}` ({conclusion.origin})" if conclusion.origin else f"conclusion `{conclusion.claim}`"
        for side, reference in (("better", conclusion.better), ("worse", conclusion.worse)):
            problems += [f"{label}: {side} {p}" for p in _reference_problems(pipeline, reference, None)]
    return problems


def candidates(pipeline: Pipeline, variant: Variant) -> list[tuple[str, ...]]:
    """Every lineage the variant may end up with, root first: ("augment.flip", "loss.ce_dice").

    A lineage starts at a variant with its own config file; each `best_of` multiplies the
    lineages by the variants it chooses among. Which one runs is decided at run time.
    """
    if variant.from_ is None:
        return [(variant.key,)]
    return [
        lineage + (variant.key,)
        for base in referenced_variants(pipeline, variant.from_)
        for lineage in candidates(pipeline, base)
    ]


def depends_on(pipeline: Pipeline, stage_name: str) -> set[str]:
    """The stages that inherit from `stage_name`, directly or through other stages (not itself):
    what a change to it invalidates."""
    pipeline.stage(stage_name)  # KeyError with a suggestion for an unknown name
    direct: dict[str, set[str]] = {}
    for stage in pipeline.stages:
        for reference in {v.from_ for v in stage.variants if v.from_ is not None}:
            for upstream in reference.stages:
                direct.setdefault(upstream, set()).add(stage.name)
    found: set[str] = set()
    todo = [stage_name]
    while todo:
        for dependent in direct.get(todo.pop(), ()):
            if dependent not in found and dependent != stage_name:
                found.add(dependent)
                todo.append(dependent)
    return found


def planned_runs(pipeline: Pipeline) -> list[tuple[Variant, int]]:
    """(variant, seed) of every run, in execution order."""
    return [(variant, seed) for variant in pipeline.variants() for seed in pipeline.seeds]


# ---------------------------------------------------------------------------------------------
# Resolving a variant's experiment config


def _key_path(item: str) -> tuple[str, ...]:
    return tuple(item.partition("=")[0].strip().split("."))


def variant_settings(pipeline: Pipeline, variant: Variant, seed: int, cli_overrides=()) -> list[tuple[str, str]]:
    """(KEY=VALUE, where it was written) applied on top of a variant's base, in order."""
    return [
        *zip(pipeline.sets, pipeline.set_origins or [f"{pipeline.path} set"] * len(pipeline.sets)),
        *zip(variant.sets, variant.set_origins or [f"{variant.origin} set"] * len(variant.sets)),
        (f"train.seed={seed}", f"seed {seed} of the pipeline"),
        *((item, f"--set {item}") for item in [*pipeline.overrides, *cli_overrides]),
    ]


def run_overrides(pipeline: Pipeline, variant: Variant, seed: int, cli_overrides=()) -> list[str]:
    """The `overrides` to give `run_experiment` for this variant, so that they win over the
    config's demo_profile as the command line's `--set` does for a single experiment."""
    return [item for item, _ in variant_settings(pipeline, variant, seed, cli_overrides)]


def resolve_variant(
    pipeline: Pipeline,
    variant: Variant,
    seed: int,
    base: ExperimentConfig | None = None,
    cli_overrides: list[str] | tuple[str, ...] = (),
) -> ExperimentConfig:
    """The experiment config one run of `variant` trains with.

    The base is `base` (the resolved config of the run its `from` picked, given by the caller)
    or its config file with `_base_` merged; then the pipeline's `set`, the variant's `set`,
    `train.seed=<seed>` and the command line's overrides, in that order. `name` is
    `<stage>.<variant>`.
    """
    label = f"stage `{variant.stage}` variant `{variant.name}`"
    if variant.from_ is not None:
        if base is None:
            raise ConfigError(f"{label} builds on {variant.from_}: pass that run's resolved config as `base`")
        raw = RawConfig(base.model_dump(mode="json"), {}, [])
    else:
        if base is not None:
            raise ConfigError(f"{label} has its own config file {variant.config}; `base` is for `from:` variants")
        if variant.config is None:
            raise ConfigError(f"{label} ({variant.origin}) has no base experiment")
        cached = pipeline.raw_config(variant.config)
        raw = RawConfig(copy.deepcopy(cached.data), dict(cached.origins), list(cached.files))
    for item, origin in variant_settings(pipeline, variant, seed, cli_overrides):
        try:
            raw = apply_overrides(raw, [item])
        except ConfigError as exc:
            raise ConfigError(f"{label} ({origin}): {exc}") from None
        raw.origins[_key_path(item)] = origin
    raw.data["name"] = variant.key
    return validate_experiment(raw, source=f"{pipeline.path}: {label}")


def resolve_lineage(
    pipeline: Pipeline, lineage: tuple[str, ...], seed: int, cli_overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """The config of a lineage's last variant, each step built on the one before: what it
    trains with if every `best_of` on the way picks the lineage's variant."""
    config = None
    for key in lineage:
        config = resolve_variant(pipeline, pipeline.variant(key), seed, config, cli_overrides)
    if config is None:
        raise ValueError("a lineage names at least one variant")
    return config


def check_pipeline(pipeline: Pipeline, cli_overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Resolve and check every candidate config of every variant; one ConfigError lists all.

    A `best_of(S)` variant is resolved on each variant of S (and each of *their* candidates)
    as its base. Each config is checked as it runs on real data and, with its demo_profile
    merged, as it runs on the demo data: model, loss, augmentation and TTA names included.
    """
    from steel_seg.experiment import ExperimentError, check_runnable, with_demo_profile

    problems = plan_problems(pipeline)
    if problems:
        raise ConfigError(_problem_list(f"pipeline {pipeline.path} cannot run", problems))
    seed = pipeline.seeds[0]
    # variant key -> (lineage, config) of each distinct config it may run with that passed
    resolved: dict[str, list[tuple[tuple[str, ...], ExperimentConfig]]] = {}
    for variant in pipeline.variants():
        if variant.from_ is None:
            bases: list[tuple[tuple[str, ...], ExperimentConfig | None]] = [((), None)]
        else:
            # A base that failed is reported where it failed; what builds on it is not resolved.
            bases = [b for ref in referenced_variants(pipeline, variant.from_) for b in resolved[ref.key]]
        overrides = run_overrides(pipeline, variant, seed, cli_overrides)
        seen: set[str] = set()
        good: list[tuple[tuple[str, ...], ExperimentConfig]] = []
        failures: dict[str, list[str]] = {}  # message -> the lineages it happens on
        for lineage, base in bases:
            try:
                config = resolve_variant(pipeline, variant, seed, base, cli_overrides)
                text = dump_config(config)
                if text in seen:
                    continue
                seen.add(text)
                check_runnable(config)
                if config.demo_profile:
                    check_runnable(with_demo_profile(config, overrides))
            except (ConfigError, ExperimentError) as exc:
                message = str(exc)
                if isinstance(exc, ExperimentError):
                    message = f"stage `{variant.stage}` variant `{variant.name}` ({variant.origin}): {message}"
                failures.setdefault(message, []).append(" > ".join(lineage))
                continue
            good.append((lineage + (variant.key,), config))
        for message, failed_on in failures.items():
            if variant.from_ is not None and good:  # fails only on some of the bases best_of may pick
                message += f"\n(when {variant.from_} is {'; '.join(dict.fromkeys(failed_on))})"
            problems.append(message)
        resolved[variant.key] = good
    if problems:
        raise ConfigError(_problem_list(f"pipeline {pipeline.path} cannot run", problems))


# ---------------------------------------------------------------------------------------------
# Describing the plan


def distinguishing_settings(configs: dict[str, ExperimentConfig]) -> dict[str, dict[str, str]]:
    """Per variant, the flattened settings whose values differ between `configs` (the variants
    of one stage); `name` and `train.seed` aside."""
    from steel_seg.tracking import flatten_params

    flat = {name: flatten_params(config.model_dump(mode="json")) for name, config in configs.items()}
    keys = list(dict.fromkeys(k for settings in flat.values() for k in settings))
    missing = object()
    differing = [
        k for k in keys
        if k not in ("name", "train.seed") and len({settings.get(k, missing) for settings in flat.values()}) > 1
    ]
    # A key absent from one variant is a section it sets differently (backbone: null vs {type: ...}).
    return {name: {k: settings[k] for k in differing if k in settings} for name, settings in flat.items()}


def stand_in_configs(pipeline: Pipeline, seed: int | None = None) -> dict[str, ExperimentConfig]:
    """Each variant resolved with the first candidate of every `best_of` standing in for its
    winner (which is known only at run time); for describing the plan, not for running it."""
    seed = pipeline.seeds[0] if seed is None else seed
    configs: dict[str, ExperimentConfig] = {}
    for variant in pipeline.variants():
        base = None
        if variant.from_ is not None:
            base = configs[referenced_variants(pipeline, variant.from_)[0].key]
        configs[variant.key] = resolve_variant(pipeline, variant, seed, base)
    return configs


def dry_run_text(pipeline: Pipeline, reused: dict[tuple[str, str, int], str] | None = None) -> str:
    """The resolved plan as `--dry-run` prints it: stages, variants, seeds, runs, reuse, and the
    settings that distinguish each stage's variants."""
    reused = reused or {}
    configs = stand_in_configs(pipeline)
    n_seeds = len(pipeline.seeds)
    lines = [
        f"pipeline {pipeline.name} ({pipeline.path}" + (f", profile {pipeline.profile})" if pipeline.profile else ")"),
        f"winner of each stage: highest mean {pipeline.metric} over seeds {pipeline.seeds} (seed s sets train.seed=s)",
    ]
    if pipeline.sets or pipeline.overrides:
        lines.append(f"set for every variant: {' '.join([*pipeline.sets, *pipeline.overrides])}")
    totals = {"train": 0, "evaluate": 0, "reused": 0}
    for stage in pipeline.stages:
        kind = "evaluate" if stage.evaluate_only else "train"
        runs = len(stage.variants) * n_seeds
        totals[kind] += runs
        verb = "re-evaluated, no training" if stage.evaluate_only else "trained"
        lines += ["", f"stage {stage.index + 1}/{len(pipeline.stages)} {stage.name}: "
                      f"{len(stage.variants)} variant(s) x {n_seeds} seed(s) = {runs} run(s) {verb}"]
        best_ofs = list(dict.fromkeys(v.from_ for v in stage.variants if v.from_ is not None and v.from_.kind == "best_of"))
        for reference in best_ofs:
            stand_in = referenced_variants(pipeline, reference)[0].key
            lines.append(f"  {reference}: the winner is known only at run time; settings below are shown "
                         f"with {stand_in} standing in for it")
        if stage.evaluate_only:
            lines.append("  each run re-evaluates the model of its `from` run with the same seed")
        settings = distinguishing_settings({v.name: configs[v.key] for v in stage.variants})
        width = max(len(v.name) for v in stage.variants)
        for variant in stage.variants:
            reference = f", seed study {100 * variant.reference_miou:.2f}%" if variant.reference_miou is not None else ""
            own = f", set {' '.join(variant.sets)}" if variant.sets else ""
            base = f"from {variant.from_}" if variant.from_ is not None else f"config {_shown(variant.config, pipeline)}"
            lines.append(f"  {variant.name:<{width}}  {base}{own}{reference}")
            distinct = settings.get(variant.name) or {}
            if distinct:
                lines.append("  " + " " * width + "  " + "  ".join(f"{k}={v}" for k, v in distinct.items()))
            for seed in pipeline.seeds:
                run_id = reused.get((stage.name, variant.name, seed))
                if run_id:
                    totals["reused"] += 1
                    lines.append("  " + " " * width + f"  seed {seed}: reuse run {run_id}")
        if len(stage.variants) > 1 and not any(settings.values()):
            lines.append("  (the variants' resolved settings are identical)")
    total = totals["train"] + totals["evaluate"]
    lines += ["", f"{total} run(s): {totals['train']} trained, {totals['evaluate']} evaluate-only; "
                  f"{totals['reused']} reused from earlier runs, {total - totals['reused']} to run"]
    return "\n".join(lines)


def _shown(path: Path | None, pipeline: Pipeline) -> str:
    """A config path as written relative to the pipeline file, where it is inside its folder."""
    if path is None or pipeline.path is None:
        return str(path)
    try:
        return str(path.resolve().relative_to(pipeline.path.resolve().parent))
    except ValueError:
        return str(path)


def summary_dict(pipeline: Pipeline) -> dict:
    """The plan as JSON-ready data: logged on the pipeline's parent run, read back by compare."""
    return {
        "name": pipeline.name,
        "metric": pipeline.metric,
        "seeds": list(pipeline.seeds),
        "stages": [
            {
                "name": stage.name,
                "index": stage.index,
                "evaluate_only": stage.evaluate_only,
                "resources": pipeline.stage_resources(stage),
                "from": None if stage.from_ is None else stage.from_.text,
                "variants": [
                    {
                        "name": v.name,
                        "from": None if v.from_ is None else v.from_.text,
                        "reference_miou": v.reference_miou,
                    }
                    for v in stage.variants
                ],
            }
            for stage in pipeline.stages
        ],
        "conclusions": [
            {"claim": c.claim, "better": c.better.text, "worse": c.worse.text} for c in pipeline.conclusions
        ],
    }
