import pytest

from segdist.config import expand_trials, load_study, parse_study, trial_from_dict
from segdist.errors import SegdistError


def study(**raw):
    return parse_study(raw, "study.yaml")


def test_seeds_repeat_every_configuration_with_the_same_values():
    s = study(
        seeds=[0, 1, 2],
        samples=2,
        search={"train.lr": {"loguniform": [1e-4, 1e-1]}, "model.variant": {"grid": ["naked", "aspp"]}},
    )
    trials = expand_trials(s)
    assert len(trials) == 2 * 2 * 3
    by_config = {}
    for trial in trials:
        by_config.setdefault(trial.config_id, []).append(trial)
    assert len(by_config) == 4
    for group in by_config.values():
        assert sorted(t.seed for t in group) == [0, 1, 2]
        assert len({(t.recipe.train.lr, t.recipe.model.variant) for t in group}) == 1


def test_expansion_is_deterministic():
    raw = dict(seeds=[0, 1], samples=3, search={"train.lr": {"loguniform": [1e-4, 1e-1]}})
    first = [(t.config_id, t.recipe.train.lr) for t in expand_trials(study(**raw))]
    again = [(t.config_id, t.recipe.train.lr) for t in expand_trials(study(**raw))]
    assert first == again
    assert len({lr for _, lr in first}) == 3


def test_variant_training_tokens_set_the_recipe():
    (trial,) = expand_trials(study(model={"variant": "naked.fpn.lr1.scale8.size64.bs4.2gpu"}))
    train, res = trial.recipe.train, trial.recipe.resources
    assert (train.epoch_scale, train.crop_size, train.batch_size, res.workers) == (8, (64, 64), 4, 2)
    assert (train.multipliers.decoder.weight, train.multipliers.decoder.bias) == (1, 2)  # lr1: decoder x1/x2
    # a study value that agrees with a token is fine
    (same,) = expand_trials(study(model={"variant": "naked.size64"}, train={"crop_size": 64}))
    assert same.recipe.train.crop_size == (64, 64)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"variant": "voc.size512"}, "train": {"crop_size": 321}},
         "train.crop_size: 321x321 contradicts variant 'voc.size512' (token 'size512' sets 512x512)"),
        ({"model": {"variant": "naked.bs8"}, "train": {"batch_size": 10}}, "token 'bs8' sets 8"),
        ({"model": {"variant": "naked.4gpu"}, "resources": {"workers": 1}}, "token '4gpu' sets 4"),
        ({"model": {"variant": "naked.fpn.lr10"}, "train": {"multipliers": {"decoder": 1}}},
         "train.multipliers.decoder: W x1, b x2, decay contradicts variant 'naked.fpn.lr10'"),
        ({"search": {"model.variant": {"grid": ["naked", "naked.size512"]}}, "train": {"crop_size": 400}},
         "contradicts variant 'naked.size512'"),
        ({"model": {"variant": "naked", "pretrained": "imagenet"}}, "model.pretrained: 'imagenet' is neither"),
        ({"model": {"variant": "cs.resnet101", "depth": 50}}, "token 'resnet101' sets 101"),
        ({"model": {"variant": "naked.fpn", "output_stride": 8}}, "run the plain ResNet (output stride 32)"),
        ({"model": {"decoder": "fpn"}}, "model.decoder comes from the variant"),
        ({"train": {"head_lr_mult": 10}}, "train.head_lr_mult is no longer a study key; use train.multipliers"),
        ({"protocol": "tensorpack"}, "protocol must be one of deeplab, original"),
        ({"search": {"train.epochs": {"uniform": [5, 10]}}}, "uniform draws real numbers; train.epochs is not one"),
        ({"search": {"data.loader_workers": {"grid": ["a"]}}}, "expected an integer"),
        ({"model": {"width": 32, "pretrained": "torchvision"}}, "model.width must be 64, got 32"),
        ({"model": {"stride_on": ["1X1", "1x1", "3x3"]}}, "model.stride_on must name 1x1 or 3x3"),
        ({"train": {"dataset": "ade"}}, "train.dataset must be one of None, voc, sbd, cityscapes, synthetic"),
        ({"train": {"momentum": 1.5}}, "train.momentum must be in [0, 1)"),
    ],
)
def test_a_study_value_that_contradicts_its_variant_is_one_error(raw, message):
    with pytest.raises(SegdistError) as err:
        study(**raw)
    assert message in str(err.value) and str(err.value).startswith("study.yaml")
    assert "\n" not in str(err.value)


def test_yaml_scientific_notation_is_a_number():
    (trial,) = expand_trials(study(train={"lr": "1e-3"}))
    assert trial.recipe.train.lr == pytest.approx(1e-3)


def test_trial_round_trips_through_a_plain_dict():
    import dataclasses

    (trial,) = expand_trials(study(train={"scale_range": [0.5, 2.0]}))
    again = trial_from_dict(dataclasses.asdict(trial))
    assert again == trial


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"trian": {}}, "unknown top-level key 'trian'"),
        ({"train": {"lrr": 1}}, "unknown key 'lrr'"),
        ({"train": {"lr": "fast"}}, "expected a number"),
        ({"train": {"epochs": 1.5}}, "expected an integer"),
        ({"train": {"scale_range": [1.5, 0.5]}}, "scale_range"),
        ({"train": {"precision": "fp16"}}, "train.precision must be one of auto, fp32, bf16"),
        ({"model": {"variant": "naked.bogus"}}, "unknown token 'bogus'"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"seeds": 3}, "seeds must be a non-empty list"),
        ({"seeds": {"min": 1, "max": 4}}, "a spread needs two seeds"),
        ({"seeds": {"min": 2, "max": 4, "ci_halfwidth": 0}}, "ci_halfwidth must be positive"),
        ({"seeds": {"min": 2, "most": 4}}, "unknown key 'most'"),
        ({"eval": {"boundary_kernels": [10]}}, "odd sizes"),
        ({"screening": {"hyperband": {}}}, "screening must be"),
        ({"search": {"train.lr": {"grid": [0.1, 0.1]}}}, "repeats a value"),
        ({"seeds": [0, 0]}, "seeds repeat"),
        ({"search": {"train.nope": {"grid": [1]}}}, "not a config value"),
        ({"search": {"train.lr": {"sometimes": [1]}}}, "unknown kind"),
        ({"search": {"train.lr": {"loguniform": [0, 1]}}}, "0 < low < high"),
        ({"resources": {"workers": 0}}, "resources.workers"),
    ],
)
def test_bad_study_values_are_one_clear_error(raw, message):
    with pytest.raises(SegdistError, match=message) as err:
        study(**raw)
    assert "study.yaml" in str(err.value)
    assert "\n" not in str(err.value)


def test_broken_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [0.1\n")
    with pytest.raises(SegdistError, match=r"broken.yaml: broken YAML \(line"):
        load_study(path)


def test_missing_study_file(tmp_path):
    with pytest.raises(SegdistError, match="study file not found"):
        load_study(tmp_path / "nope.yaml")


def test_every_shipped_study_parses():
    from pathlib import Path

    import yaml

    for path in sorted(Path(__file__).resolve().parent.parent.glob("tune_spaces/*.yaml")):
        if "kind" in yaml.safe_load(path.read_text()):
            continue  # not a training study (crf_grid): its own loader tests it
        assert expand_trials(load_study(path))


def test_a_multiplier_that_restates_its_token_is_not_a_contradiction():
    """A bare number keeps the group's bias ratio: x1 biases for the naked family's Sobel module
    (('edge.*', N) hit no bias), x2 for the FPN decoder."""
    (trial,) = expand_trials(study(protocol="original", model={"variant": "naked.sobel.lr10"},
                                   train={"multipliers": {"extras": 10}}))
    assert (trial.recipe.train.multipliers.extras.weight, trial.recipe.train.multipliers.extras.bias) == (10, 10)
    (trial,) = expand_trials(study(protocol="original", model={"variant": "naked.fpn"},
                                   train={"multipliers": {"decoder": 5}}))
    assert (trial.recipe.train.multipliers.decoder.weight, trial.recipe.train.multipliers.decoder.bias) == (5, 10)


@pytest.mark.parametrize("name", ["it's", 'say "hi"', "run (2)", "Straße 日本", "a b"])
def test_a_study_name_with_quotes_spaces_parentheses_or_non_ascii_is_kept(name):
    assert parse_study({"name": name}, "s.yaml").name == name


@pytest.mark.parametrize("name", ["a/b", "..", "x\\y", "tab\there", "q?", "f#1", "50%", " ", "n" * 201])
def test_a_study_name_that_cannot_be_one_storage_folder_is_one_error(name):
    with pytest.raises(SegdistError, match=r"s\.yaml: name .* cannot name one storage folder"):
        parse_study({"name": name}, "s.yaml")
