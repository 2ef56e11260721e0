"""The pipeline plan: pipeline.yaml parsed, resolved and checked before anything trains."""

import json
import time
from pathlib import Path

import pytest

from steel_seg.config import ConfigError
from steel_seg.experiment import with_demo_profile
from steel_seg.pipeline.plan import (
    candidates,
    check_pipeline,
    depends_on,
    distinguishing_settings,
    dry_run_text,
    load_pipeline,
    parse_reference,
    planned_runs,
    resolve_lineage,
    resolve_variant,
    run_overrides,
    summary_dict,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pipeline.yaml"
CE = [("CrossEntropyLoss", 1.0)]
CE_LOVASZ = [("CrossEntropyLoss", 0.8), ("LovaszSoftmaxLoss", 0.2)]
CE_DICE = [("CrossEntropyLoss", 0.8), ("DiceLoss", 0.2)]

# The seed study's table (README), row by row: the lineage the seed ran (its best_of picks), then
# (model, backbone, epochs, augment, loss terms, defect-free images, published mIoU).
SEED_STUDY = {
    ("baselines.deeplabv3_r50",): ("DeepLabV3", "ResNet50_vd", 10, "flip", CE, False, 0.486),
    ("baselines.hrnet_w18",): ("FCN", "HRNet_W18", 10, "flip", CE, False, 0.438),
    ("baselines.unet",): ("UNet", None, 10, "flip", CE, False, 0.462),
    ("baselines.fastscnn",): ("FastSCNN", None, 10, "flip", CE, False, 0.389),
    ("augment.flip",): ("UNet", None, 100, "flip", CE, False, 0.522),
    ("augment.flip_distort_crop",): ("UNet", None, 100, "flip_distort_crop", CE, False, 0.534),
    ("augment.flip_distort_crop", "loss.ce_lovasz"): ("UNet", None, 100, "flip_distort_crop", CE_LOVASZ, False, 0.564),
    ("augment.flip_distort_crop", "loss.ce_dice"): ("UNet", None, 100, "flip_distort_crop", CE_DICE, False, 0.567),
    ("augment.flip_distort_crop", "loss.ce_lovasz", "defect_free.ce_lovasz_defect_free"):
        ("UNet", None, 100, "flip_distort_crop", CE_LOVASZ, True, 0.5667),
    ("augment.flip_distort_crop", "loss.ce_dice", "defect_free.ce_dice_defect_free"):
        ("UNet", None, 100, "flip_distort_crop", CE_DICE, True, 0.5752),
}

SMALL = """\
name: small
metric: final_val_miou
{seeds}
stages:
  - name: base
    variants:
      unet: {{config: {exp}/unet.yaml}}
      fastscnn: {{config: {exp}/fastscnn.yaml}}
  - name: aug
    from: best_of(base)
    variants:
      plain: {{}}
      crop: {{set: [augment=flip_distort_crop]}}
  - name: loss
    from: best_of(aug)
    variants:
      dice: {{set: ["loss.use_mixed_loss=[[CrossEntropyLoss, 0.8], [DiceLoss, 0.2]]"]}}
  - name: extra
    variants:
      fixed: {{from: base.unet, set: [train.epochs=3]}}
{tail}
"""


def write_pipeline(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def small(tmp_path, seeds="repeats: 1", tail="", **replace) -> Path:
    text = SMALL.format(exp=ROOT / "experiments", seeds=seeds, tail=tail)
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return write_pipeline(tmp_path, text)


def shipped_copy(tmp_path, old: str, new: str) -> Path:
    """pipeline.yaml in tmp_path (configs pointing at the repo) with one edit."""
    text = SHIPPED.read_text().replace("config: experiments/", f"config: {ROOT}/experiments/")
    assert old in text
    return write_pipeline(tmp_path, text.replace(old, new, 1))


def problems_of(path, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        check_pipeline(load_pipeline(path, **kwargs))
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# The shipped pipeline


@pytest.fixture(scope="module")
def shipped():
    pipeline = load_pipeline(SHIPPED)
    check_pipeline(pipeline)
    return pipeline


def test_shipped_pipeline_has_the_study_stages(shipped):
    assert [s.name for s in shipped.stages] == ["baselines", "augment", "loss", "defect_free", "tta"]
    assert shipped.name == "severstal_seed_study" and shipped.metric == "final_val_miou" and shipped.seeds == [0]
    assert [s.evaluate_only for s in shipped.stages] == [False, False, False, False, True]
    # The seed kept UNet after the baselines: augment names UNet's file, and says why.
    augment = shipped.stage("augment")
    assert augment.from_ is None and augment.config.name == "unet_flip.yaml"
    assert "kept UNet" in SHIPPED.read_text()
    assert str(shipped.stage("loss").from_) == "best_of(augment)"
    assert str(shipped.stage("tta").from_) == "best_of(baselines, augment, loss, defect_free)"
    assert [str(c.better) for c in shipped.conclusions] == [
        "augment.flip_distort_crop", "best_of(loss)", "loss.ce_dice", "best_of(defect_free)"]


@pytest.mark.parametrize("lineage", list(SEED_STUDY), ids=[lin[-1] for lin in SEED_STUDY])
def test_shipped_pipeline_reproduces_the_seed_table(shipped, lineage):
    assert lineage in candidates(shipped, shipped.variant(lineage[-1]))
    config = resolve_lineage(shipped, lineage, seed=0)
    model, backbone, epochs, augment, terms, defect_free, miou = SEED_STUDY[lineage]
    assert config.name == lineage[-1]
    assert (config.model.type, (config.model.backbone or {}).get("type")) == (model, backbone)
    assert (config.train.epochs, config.augment, config.loss.terms(), config.data.include_defect_free) == (
        epochs, augment, terms, defect_free)
    assert (config.data.size, config.train.batch_size, config.train.learning_rate) == ((400, 64), 16, 0.01)
    assert config.loss.aux_weights == ([0.4] if model == "FastSCNN" else None)
    assert shipped.variant(lineage[-1]).reference_miou == miou


def test_shipped_tta_stage_only_changes_evaluation(shipped):
    lineage = ("augment.flip_distort_crop", "loss.ce_dice", "defect_free.ce_dice_defect_free")
    best = resolve_lineage(shipped, lineage, seed=0)
    flip = resolve_lineage(shipped, lineage + ("tta.flip_tta",), seed=0)
    plain = resolve_lineage(shipped, lineage + ("tta.plain",), seed=0)
    assert (flip.eval.tta, plain.eval.tta) == (["hflip"], [])
    assert flip.model_dump(exclude={"name", "eval"}) == best.model_dump(exclude={"name", "eval"})


def test_smoke_profile_runs_every_stage_tiny_on_the_demo_data():
    smoke = load_pipeline(SHIPPED, profile="smoke")
    check_pipeline(smoke)
    assert smoke.seeds == [0, 1] and smoke.profile == "smoke"
    runs = planned_runs(smoke)
    assert len(runs) == 24
    assert sum(not smoke.stage(v.stage).evaluate_only for v, _ in runs) == 20
    for lineage in SEED_STUDY:
        config = resolve_lineage(smoke, lineage, seed=1)
        assert config.data.root is None and config.train.seed == 1  # demo data even where data/severstal exists
        demo = with_demo_profile(config, run_overrides(smoke, smoke.variant(lineage[-1]), 1))
        assert demo.data.size == (64, 32) and demo.data.demo.num_images == 240
        assert (demo.train.epochs, demo.train.max_steps_per_epoch, demo.train.batch_size, demo.eval.batch_size) == (1, 3, 2, 8)
        # Only the demo profile shrank: the settings that distinguish the study are intact.
        model, backbone, epochs, augment, terms, defect_free, _ = SEED_STUDY[lineage]
        assert (demo.model.type, demo.augment, demo.loss.terms(), demo.data.include_defect_free) == (
            model, augment, terms, defect_free)


# ---------------------------------------------------------------------------------------------
# Mistakes fail before anything runs


def test_typo_in_the_last_stage_fails_the_check_in_seconds(tmp_path, shipped, monkeypatch):
    import steel_seg.experiment

    def no_training(*args, **kwargs):
        raise AssertionError("check_pipeline must not train")

    monkeypatch.setattr(steel_seg.experiment, "run_experiment", no_training)
    path = shipped_copy(tmp_path, 'flip_tta: {set: ["eval.tta=[hflip]"]}', 'flip_tta: {set: ["eval.ttta=[hflip]"]}')
    pipeline = load_pipeline(path)  # the structure is fine; the key is checked by resolving
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        check_pipeline(pipeline)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "stage `tta` variant `flip_tta`" in message
    assert "eval.ttta" in message and "did you mean `tta`?" in message
    assert f"{path}:" in message  # the line of the `set` item in the pipeline file
    assert message.count("eval.ttta (") == 1  # once, not once per candidate base


def test_bad_names_in_a_late_stage_are_caught_by_check_runnable(tmp_path):
    path = shipped_copy(tmp_path, 'flip_tta: {set: ["eval.tta=[hflip]"]}', 'flip_tta: {set: ["eval.tta=[hflipp]"]}')
    message = problems_of(path)
    assert "stage `tta` variant `flip_tta`" in message and "hflipp" in message
    path = shipped_copy(tmp_path, "ce_lovasz: {set: [loss.use_mixed_loss=true]",
                        "ce_lovasz: {set: [\"loss.use_mixed_loss=[[CrossEntropyLoss, 0.8], [DiceLos, 0.2]]\"]")
    message = problems_of(path)
    assert "stage `loss` variant `ce_lovasz`" in message and "DiceLos" in message


def test_every_problem_is_listed_at_once(tmp_path):
    path = small(tmp_path, **{"[augment=flip_distort_crop]": "[augment=flip_distort_crop, train.epoch=2]",
                              "[train.epochs=3]": "[train.epochs=3, train.batchsize=2]"})
    message = problems_of(path)
    assert "stage `aug` variant `crop`" in message and "did you mean `epochs`?" in message
    assert "stage `extra` variant `fixed`" in message and "did you mean `batch_size`?" in message


def test_unknown_keys_name_file_stage_variant_and_suggest(tmp_path):
    path = small(tmp_path, **{"from: best_of(base)": "form: best_of(base)",
                              "fixed: {from": "fixed: {reference_mio: 0.5, from", "name: small": "name: small\nstagse: []"})
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert f"stage `aug` ({path}:" in message and "unknown key `form`; did you mean `from`?" in message
    assert "stage `extra` variant `fixed`" in message and "did you mean `reference_miou`?" in message
    assert "top level" in message and "did you mean `stages`?" in message


def test_resources_per_pipeline_and_stage_are_checked(tmp_path):
    path = small(tmp_path, **{"name: small": "name: small\nresources: {cpus: 2, gpus: 0.5}",
                              "  - name: loss\n": "  - name: loss\n    resources: {gpus: 1, memory_gb: 4}\n"})
    pipeline = load_pipeline(path)
    assert pipeline.stage_resources(pipeline.stage("base")) == {"cpus": 2.0, "gpus": 0.5}
    assert pipeline.stage_resources(pipeline.stage("loss")) == {"cpus": 2.0, "gpus": 1.0, "memory_gb": 4.0}
    assert load_pipeline(small(tmp_path)).resources == {"cpus": 1.0, "gpus": 0.0}  # one CPU each by default

    bad = small(tmp_path, **{"name: small": "name: small\nresources: {cpu: 2, gpus: -1}"})
    with pytest.raises(ConfigError) as info:
        load_pipeline(bad)
    message = str(info.value)
    assert f"({bad}:2)" in message and "unknown key `cpu`; did you mean `cpus`?" in message
    assert "resources.gpus must be a number >= 0, got -1" in message


def test_dangling_references_suggest_the_right_name(tmp_path):
    path = small(tmp_path, **{"best_of(aug)": "best_of(agu)", "from: base.unet": "from: base.unte"},
                 tail="conclusions:\n  - {claim: crop helps, better: aug.crap, worse: best_of(nope)}")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert "`best_of(agu)` names no stage `agu`; did you mean `aug`?" in message
    assert "stage `base` has no variant `unte`; did you mean `unet`?" in message
    assert "conclusion `crop helps`" in message and "no variant `crap`; did you mean `crop`?" in message
    assert "names no stage `nope`" in message


def test_references_to_the_same_or_a_later_stage_are_errors(tmp_path):
    path = small(tmp_path, **{"from: best_of(base)": "from: best_of(loss)", "from: base.unet": "from: extra.fixed"})
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert "stage `aug`" in message and "stage `loss` comes later" in message
    assert "stage `extra` variant `fixed`" in message and "stage `extra` is this stage" in message


def test_malformed_plans(tmp_path):
    path = small(tmp_path, **{"  - name: extra": "  - name: aug\n    variants: {}\n  - name: extra",
                              "from: best_of(aug)": "from: best of aug"})
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert "duplicate stage name" in message
    assert "no variants" in message
    assert "expected best_of(STAGE[, STAGE...]) or STAGE.VARIANT" in message
    with pytest.raises(ValueError, match=r"did you mean `best_of\(augment\)`"):
        parse_reference("augment")
    path = small(tmp_path, **{"{config: " + str(ROOT / "experiments") + "/unet.yaml}": "{config: unet_flp.yaml, set: [oops]}"})
    message = str(pytest.raises(ConfigError, load_pipeline, path).value)
    assert "config file not found: unet_flp.yaml" in message and "set[0] must be KEY=VALUE" in message


def test_evaluate_only_stages_re_evaluate_and_change_evaluation_only(tmp_path):
    tail = ("  - name: tta\n    from: best_of(aug)\n    evaluate_only: true\n    variants:\n"
            "      flip: {set: [\"eval.tta=[hflip]\", train.epochs=1]}\n"
            f"      own: {{config: {ROOT}/experiments/unet.yaml}}\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(small(tmp_path, tail=tail))
    message = str(info.value)
    assert "set `train.epochs=1`: an evaluate-only variant may change only eval.*" in message
    assert "stage `tta` variant `own`" in message and "give `from:`" in message
    tail = "  - name: later\n    from: best_of(tta)\n    variants: {x: {}}\n"
    good = "  - name: tta\n    from: best_of(aug)\n    evaluate_only: true\n    variants:\n      flip: {set: [\"eval.tta=[hflip]\"]}\n"
    with pytest.raises(ConfigError, match="stage `tta` is evaluate-only and trains no model"):
        load_pipeline(small(tmp_path, tail=good + tail))


# ---------------------------------------------------------------------------------------------
# Resolution


def test_resolve_variant_order_of_settings(tmp_path):
    path = small(tmp_path, tail="set: [train.epochs=7, train.batch_size=3]")
    pipeline = load_pipeline(path, overrides=["train.learning_rate=0.5"])
    fixed = pipeline.variant("extra.fixed")
    base = resolve_variant(pipeline, pipeline.variant("base.unet"), seed=4)
    assert (base.name, base.train.seed, base.train.epochs, base.train.batch_size) == ("base.unet", 4, 7, 3)
    config = resolve_variant(pipeline, fixed, seed=4, base=base, cli_overrides=["train.batch_size=5"])
    # the pipeline's set, then the variant's (epochs 3), then the command line (lr, batch 5)
    assert (config.name, config.train.epochs, config.train.batch_size, config.train.learning_rate) == (
        "extra.fixed", 3, 5, 0.5)
    assert run_overrides(pipeline, fixed, 4, ["train.batch_size=5"]) == [
        "train.epochs=7", "train.batch_size=3", "train.epochs=3", "train.seed=4", "train.learning_rate=0.5", "train.batch_size=5"]
    with pytest.raises(ConfigError, match="builds on base.unet: pass that run's resolved config"):
        resolve_variant(pipeline, fixed, seed=0)


def test_best_of_candidates_and_lineages(tmp_path):
    pipeline = load_pipeline(small(tmp_path))
    check_pipeline(pipeline)
    assert candidates(pipeline, pipeline.variant("base.unet")) == [("base.unet",)]
    assert candidates(pipeline, pipeline.variant("loss.dice")) == [
        ("base.unet", "aug.plain", "loss.dice"), ("base.fastscnn", "aug.plain", "loss.dice"),
        ("base.unet", "aug.crop", "loss.dice"), ("base.fastscnn", "aug.crop", "loss.dice"),
    ]
    assert candidates(pipeline, pipeline.variant("extra.fixed")) == [("base.unet", "extra.fixed")]
    config = resolve_lineage(pipeline, ("base.fastscnn", "aug.crop", "loss.dice"), seed=0)
    assert (config.model.type, config.augment, config.loss.terms()) == ("FastSCNN", "flip_distort_crop", CE_DICE)


def test_a_setting_that_fails_on_some_candidates_names_them(tmp_path):
    # use_deconv is a UNet argument: the loss stage runs if best_of(base) picks UNet, not FastSCNN.
    path = small(tmp_path, **{"dice: {set: [": "dice: {set: [model.use_deconv=true, "})
    message = problems_of(path)
    assert "stage `loss` variant `dice`" in message and "use_deconv" in message
    assert "(when best_of(aug) is base.fastscnn > aug.plain; base.fastscnn > aug.crop)" in message


def test_depends_on_follows_inheritance(tmp_path, shipped):
    pipeline = load_pipeline(small(tmp_path))
    assert depends_on(pipeline, "base") == {"aug", "loss", "extra"}
    assert depends_on(pipeline, "aug") == {"loss"}
    assert depends_on(pipeline, "loss") == set() and depends_on(pipeline, "extra") == set()
    assert depends_on(shipped, "augment") == {"loss", "defect_free", "tta"}
    assert depends_on(shipped, "loss") == {"defect_free", "tta"}
    assert depends_on(shipped, "baselines") == {"tta"}
    with pytest.raises(KeyError, match="did you mean `loss`"):
        depends_on(shipped, "los")


# ---------------------------------------------------------------------------------------------
# Seeds and profiles


@pytest.mark.parametrize("seeds, expected", [("repeats: 3", [0, 1, 2]), ("seeds: [5, 7]", [5, 7]), ("", [0])])
def test_seeds_or_repeats(tmp_path, seeds, expected):
    pipeline = load_pipeline(small(tmp_path, seeds=seeds))
    assert pipeline.seeds == expected
    config = resolve_variant(pipeline, pipeline.variant("base.unet"), seed=expected[-1])
    assert config.train.seed == expected[-1]


@pytest.mark.parametrize("seeds, error", [
    ("repeats: 2\nseeds: [1]", "not both"), ("repeats: 0", "repeats must be an integer >= 1"),
    ("seeds: [1, 1]", "seeds repeat a value"), ("seeds: []", "non-empty list of integers"),
])
def test_bad_seeds(tmp_path, seeds, error):
    with pytest.raises(ConfigError, match=error):
        load_pipeline(small(tmp_path, seeds=seeds))


def test_profiles_append_set_and_replace_seeds(tmp_path):
    tail = "set: [train.epochs=7]\nprofiles:\n  quick: {repeats: 2, set: [train.epochs=1, train.batch_size=2]}\n  fixed: {seeds: [9]}"
    path = small(tmp_path, seeds="seeds: [3, 4, 5]", tail=tail)
    plain = load_pipeline(path)
    assert plain.seeds == [3, 4, 5] and plain.sets == ["train.epochs=7"]
    quick = load_pipeline(path, profile="quick")
    assert quick.seeds == [0, 1] and quick.sets == ["train.epochs=7", "train.epochs=1", "train.batch_size=2"]
    config = resolve_variant(quick, quick.variant("base.unet"), seed=1)
    assert (config.train.epochs, config.train.batch_size) == (1, 2)
    assert load_pipeline(path, profile="fixed").seeds == [9]
    with pytest.raises(ConfigError, match="no profile `quik`; did you mean `quick`?"):
        load_pipeline(path, profile="quik")
    bad = small(tmp_path, tail="profiles:\n  quick: {repeat: 2}")
    with pytest.raises(ConfigError, match="profile `quick`.*unknown key `repeat`; did you mean `repeats`?"):
        load_pipeline(bad)


# ---------------------------------------------------------------------------------------------
# Describing the plan


def test_distinguishing_settings(shipped):
    configs = {v.name: resolve_variant(shipped, v, seed=i) for i, v in enumerate(shipped.stage("baselines").variants)}
    settings = distinguishing_settings(configs)
    assert settings["deeplabv3_r50"]["model.type"] == "DeepLabV3"
    assert settings["deeplabv3_r50"]["model.backbone.type"] == "ResNet50_vd"
    assert settings["fastscnn"] == {"model.type": "FastSCNN", "model.backbone": "None", "loss.aux_weights": "[0.4]"}
    assert not any("train.seed" in s or "name" in s for s in settings.values())  # seeds and names differ: ignored
    augment = {v.name: resolve_variant(shipped, v, seed=0) for v in shipped.stage("augment").variants}
    assert distinguishing_settings(augment) == {"flip": {"augment": "flip"}, "flip_distort_crop": {"augment": "flip_distort_crop"}}


def test_dry_run_text():
    smoke = load_pipeline(SHIPPED, profile="smoke")
    text = dry_run_text(smoke, reused={("baselines", "unet", 1): "run123", ("augment", "flip", 0): "run456"})
    assert "pipeline severstal_seed_study" in text and "profile smoke" in text and "seeds [0, 1]" in text
    assert "stage 1/5 baselines: 4 variant(s) x 2 seed(s) = 8 run(s) trained" in text
    assert "stage 5/5 tta: 2 variant(s) x 2 seed(s) = 4 run(s) re-evaluated, no training" in text
    assert "seed 1: reuse run run123" in text and "seed 0: reuse run run456" in text
    assert "24 run(s): 20 trained, 4 evaluate-only; 2 reused from earlier runs, 22 to run" in text
    assert "model.type=DeepLabV3" in text and "augment=flip_distort_crop" in text and 'eval.tta=["hflip"]' in text
    assert "best_of(augment): the winner is known only at run time" in text
    assert "data.root=null" in text  # the profile's settings for every variant


def test_summary_dict_is_what_compare_reads(shipped):
    summary = json.loads(json.dumps(summary_dict(shipped)))
    assert set(summary) == {"name", "metric", "seeds", "stages", "conclusions"}
    assert [s["name"] for s in summary["stages"]] == ["baselines", "augment", "loss", "defect_free", "tta"]
    loss = summary["stages"][2]
    assert set(loss) == {"name", "index", "evaluate_only", "resources", "from", "variants"}
    assert (loss["index"], loss["from"], loss["evaluate_only"]) == (2, "best_of(augment)", False)
    assert loss["variants"] == [
        {"name": "ce_lovasz", "from": "best_of(augment)", "reference_miou": 0.564},
        {"name": "ce_dice", "from": "best_of(augment)", "reference_miou": 0.567},
    ]
    assert summary["stages"][3]["variants"][1]["from"] == "loss.ce_dice"
    assert summary["stages"][0]["variants"][0] == {"name": "deeplabv3_r50", "from": None, "reference_miou": 0.486}
    assert summary["stages"][4]["evaluate_only"] is True
    assert summary["conclusions"][1] == {"claim": "the mixed loss helps", "better": "best_of(loss)", "worse": "augment.flip_distort_crop"}
