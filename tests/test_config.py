import pytest

from steel_seg.config import ConfigError, dump_config, load_experiment


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path):
    _write(tmp_path / "_base_" / "data.yaml", "data:\n  size: [400, 64]\n  include_defect_free: false\n")
    _write(tmp_path / "_base_" / "train.yaml", "train:\n  epochs: 10\n  batch_size: 16\n  learning_rate: 0.01\n")
    _write(
        tmp_path / "unet.yaml",
        "_base_: [_base_/data.yaml, _base_/train.yaml]\nmodel: {type: UNet}\ntrain:\n  epochs: 100\n",
    )
    return tmp_path


def test_bases_merge_and_the_including_file_wins(tree):
    config = load_experiment(tree / "unet.yaml")
    assert config.name == "unet"
    assert config.train.epochs == 100  # from unet.yaml
    assert config.train.batch_size == 16  # from the base, deep-merged
    assert config.data.size == (400, 64)


def test_nested_base_and_set_overrides(tree):
    _write(tree / "child.yaml", "_base_: unet.yaml\ndata:\n  include_defect_free: true\n")
    config = load_experiment(tree / "child.yaml", ["train.epochs=3", "model.type=FCN", "model.backbone={type: HRNet_W18}"])
    assert config.data.include_defect_free is True and config.train.epochs == 3
    assert config.model.type == "FCN" and config.model.backbone == {"type": "HRNet_W18"}


def test_unknown_key_names_key_file_line_and_suggestion(tree):
    _write(tree / "_base_" / "train.yaml", "train:\n  epochs: 10\n  batchsize: 16\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(tree / "unet.yaml")
    message = str(info.value)
    assert "train.batchsize" in message
    assert f"{tree / '_base_' / 'train.yaml'}:3" in message
    assert "did you mean `batch_size`?" in message


def test_unknown_key_from_set_and_alias_suggestion(tree):
    with pytest.raises(ConfigError, match=r"train.lr \(--set train.lr=0.1\): unknown key `lr`; did you mean `learning_rate`"):
        load_experiment(tree / "unet.yaml", ["train.lr=0.1"])


def test_unknown_section_suggests(tree):
    with pytest.raises(ConfigError, match="did you mean `tracking`"):
        load_experiment(tree / "unet.yaml", ["traking.uri=x"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epochs=0", "train.epochs (--set train.epochs=0): Input should be greater than or equal to 1"),
        ("train.batch_size=many", "train.batch_size (--set train.batch_size=many)"),
        ("data.size=[400]", "data.size"),
        ("data.on_bad_sample=ignore", "data.on_bad_sample"),
        ("data.split.ratios=[0.5, 0.5, 0.5]", "sum to 1"),
        ("loss.use_mixed_loss=[[CrossEntropyLoss, -1]]", "must be > 0"),
    ],
)
def test_bad_values_name_the_key(tree, override, fragment):
    with pytest.raises(ConfigError) as info:
        load_experiment(tree / "unet.yaml", [override])
    assert fragment in str(info.value)


def test_paddlex_mixed_loss_vocabulary(tree):
    assert load_experiment(tree / "unet.yaml").loss.terms() == [("CrossEntropyLoss", 1.0)]
    config = load_experiment(tree / "unet.yaml", ["loss.use_mixed_loss=true"])
    assert config.loss.terms() == [("CrossEntropyLoss", 0.8), ("LovaszSoftmaxLoss", 0.2)]
    config = load_experiment(tree / "unet.yaml", ['loss.use_mixed_loss=[["CrossEntropyLoss", 0.8], ["DiceLoss", 0.2]]'])
    assert config.loss.terms() == [("CrossEntropyLoss", 0.8), ("DiceLoss", 0.2)]
    # PaddleX puts it on the model: UNet(use_mixed_loss=True)
    config = load_experiment(tree / "unet.yaml", ["model.use_mixed_loss=true"])
    assert config.loss.terms()[1] == ("LovaszSoftmaxLoss", 0.2) and "use_mixed_loss" not in config.model.kwargs()


def test_printed_config_loads_back_identically(tree, tmp_path):
    config = load_experiment(tree / "unet.yaml", ["loss.use_mixed_loss=true", "augment=flip_distort_crop"])
    dumped = _write(tmp_path / "resolved.yaml", dump_config(config))
    assert load_experiment(dumped) == config


def test_yaml_syntax_error_names_line(tmp_path):
    path = _write(tmp_path / "bad.yaml", "train:\n  epochs: 3\n   batch_size: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: YAML syntax error"):
        load_experiment(path)


def test_base_cycle_and_missing_base(tmp_path):
    _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_experiment(tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", "_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match="c.yaml: `_base_` file not found: nope.yaml"):
        load_experiment(tmp_path / "c.yaml")


def test_duplicate_key_is_an_error(tmp_path):
    path = _write(tmp_path / "dup.yaml", "train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match="dup.yaml:3: duplicate key `epochs`"):
        load_experiment(path)


def test_bad_set_syntax(tree):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_experiment(tree / "unet.yaml", ["train.epochs"])
