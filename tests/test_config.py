import pytest

from cljax import config as cfgmod


def test_overrides_set_typed_values_and_dict_entries():
    base = cfgmod.Config()
    cfg = cfgmod.apply_overrides(
        base,
        [
            "train.learning_rate=1e-4",
            "train.epochs=3",
            "method.name=osf",
            "method.options.rank_fraction=0.25",
            "run.mesh={'data': 8}",
            "train.learning_rate=2",
        ],
    )
    assert cfg.train.learning_rate == 2.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.epochs == 3
    assert cfg.method.name == "osf"
    assert cfg.method.options == {"rank_fraction": 0.25}
    assert cfg.run.mesh == {"data": 8}
    assert base.method.options == {} and base.train.epochs == 1  # the input is untouched


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(KeyError, match=r"unknown config key 'train.lr'.*learning_rate"):
        cfgmod.apply_overrides(cfgmod.Config(), ["train.lr=1"])
    with pytest.raises(KeyError, match=r"optim.lr.*'train'"):
        cfgmod.apply_overrides(cfgmod.Config(), ["optim.lr=1"])
    with pytest.raises(ValueError, match="expects int"):
        cfgmod.apply_overrides(cfgmod.Config(), ["train.epochs=abc"])
    with pytest.raises(ValueError, match="key=value"):
        cfgmod.apply_overrides(cfgmod.Config(), ["train.epochs"])
    with pytest.raises(KeyError, match="unknown keys"):
        cfgmod.config_from_dict({"train": {"lr": 1}})


def test_round_trip_through_dict_and_file(tmp_path):
    cfg = cfgmod.apply_overrides(cfgmod.Config(), ["model.family=t5", "eval.mode=rank"])
    assert cfgmod.config_from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "exp.py"
    path.write_text(
        "from cljax.config import Config\n"
        "def get_config():\n"
        "    cfg = Config()\n"
        "    cfg.train.batch_size = 4\n"
        "    return cfg\n"
    )
    assert cfgmod.load_config(path).train.batch_size == 4
    with pytest.raises(FileNotFoundError, match="nope.py"):
        cfgmod.load_config(tmp_path / "nope.py")


def test_every_field_is_documented():
    for line in cfgmod.describe():
        key, rest = line.split("  # ", 1)
        assert rest.split("(default")[0].strip(), f"{key} has no documentation"


def test_per_method_settings_apply_to_that_method_only():
    cfg = cfgmod.Config()
    cfg.method.per_method = {
        "osf": {"train.learning_rate": 1e-5, "method.options.rank_fraction": 0.25},
        "olora": {"method.options.lambda1": 0.1},
    }
    osf = cfgmod.for_method(cfg, "osf")
    assert osf.method.name == "osf" and osf.train.learning_rate == 1e-5
    assert osf.method.options == {"rank_fraction": 0.25}
    seqft = cfgmod.for_method(cfg, "seqft")
    assert seqft.train.learning_rate == cfg.train.learning_rate and seqft.method.options == {}
    cfg.method.per_method = {"osf": {"train.lr": 1.0}}
    with pytest.raises(KeyError, match="train.lr"):
        cfgmod.for_method(cfg, "osf")


def test_a_value_set_after_for_method_survives_resolving_again():
    # A notebook's pattern: a method's config, one value changed, then a run (which
    # resolves its config again). per_method must not silently win over the edit.
    cfg = cfgmod.Config()
    cfg.method.per_method = {"osf": {"train.learning_rate": 1e-5}, "gorp": {"train.epochs": 2}}
    osf = cfgmod.for_method(cfg, "osf")
    assert set(osf.method.per_method) == {"gorp"}  # applied, so not applied again
    osf.train.learning_rate = 3e-4
    assert cfgmod.resolve(osf).train.learning_rate == 3e-4
    # ... and a saved config that still lists the entry resumes: the values are compared
    saved = cfgmod.resolve(cfg, method="osf").to_dict()
    saved["method"]["per_method"] = cfg.method.per_method
    assert cfgmod.resume_diff(saved, cfgmod.resolve(cfg, method="osf")) == []
    assert cfgmod.resume_diff(saved, osf) == ["train.learning_rate: 1e-05 -> 0.0003"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.learning_rate=0", "train.learning_rate=0.0: must be > 0"),
        ("train.epochs=0", "train.epochs=0: must be > 0"),
        ("train.batch_size=0", "train.batch_size=0: must be > 0"),
        ("train.grad_accum_steps=0", "train.grad_accum_steps=0: must be > 0"),
        ("train.clip_norm=-1", "train.clip_norm=-1.0: must be >= 0"),
        ("train.warmup_steps=-2", "train.warmup_steps=-2: must be >= 0"),
        ("run.checkpoint_every_steps=-1", "run.checkpoint_every_steps=-1: must be >= 0"),
        ("eval.batch_size=0", "eval.batch_size=0: must be > 0"),
        ("data.order=' , '", "data.order is empty"),
        ("eval.mode=greedy", "eval.mode='greedy': must be one of generate, rank"),
        ("data.source=csv", "data.source='csv': must be one of synthetic, json, tfds"),
        ("train.schedule=step", "train.schedule='step': must be one of constant, linear, cosine"),
        ("data.truncation=cut", "data.truncation='cut': must be one of keep_answer, release"),
        ("data.invalid_labels=drop", "data.invalid_labels='drop': must be one of exclude, error"),
        (
            "model.family=gpt",
            "model.family='gpt': unknown model family 'gpt'; valid: ['llama', 'mistral', 'qwen2',"
            " 't5']",
        ),
        ("model.remat=all", "model.remat='all': must be one of none, full, dots, dots_no_batch"),
        ("data.holdout_fraction=1.5", "data.holdout_fraction=1.5 must be in [0, 1)"),
    ],
)
def test_bad_run_values_are_named_before_any_work(override, message):
    with pytest.raises(ValueError) as err:
        cfgmod.resolve(cfgmod.Config(), [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "line,message",
    [
        ("cfg.train.epochs = 2.5", "train.epochs=2.5: expects an integer"),
        ("cfg.train.batch_size = '4'", "train.batch_size='4': expects an integer"),
        ("cfg.run.progress = 'no'", "run.progress='no': expects True or False"),
        ("cfg.data.length_buckets = 64", "data.length_buckets=64: expects a list"),
    ],
)
def test_config_file_values_are_typed(tmp_path, line, message):
    path = tmp_path / "exp.py"
    path.write_text(
        f"from cljax.config import Config\ndef get_config():\n    cfg = Config()\n    {line}\n"
        "    return cfg\n"
    )
    with pytest.raises(ValueError) as err:
        cfgmod.resolve(cfgmod.load_config(path))
    assert message in str(err.value)
    cfg = cfgmod.Config()
    cfg.train.learning_rate = 1  # an int where a float is expected: taken as 1.0
    assert cfgmod.resolve(cfg).train.learning_rate == 1.0


def test_config_file_setting_an_unknown_attribute_is_named(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(
        "from cljax.config import Config\n"
        "def get_config():\n"
        "    c = Config()\n"
        "    c.train.batchsize = 4\n"
        "    return c\n"
    )
    with pytest.raises(AttributeError, match="unknown config key 'train.batchsize'"):
        cfgmod.load_config(path)
    with pytest.raises(AttributeError, match="unknown config key 'trian'"):
        cfgmod.Config().trian = 1
