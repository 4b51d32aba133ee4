import pytest

from normlab.config import load_config_file, parse_overrides, parse_value, resolve
from normlab.errors import ConfigError


def test_parse_value():
    assert parse_value("1e-5") == 1e-5 and isinstance(parse_value("3"), int)
    assert parse_value("true") is True and parse_value("Off") is False
    assert parse_value("none") is None and parse_value("[0.3,0.6, 0.8]") == [0.3, 0.6, 0.8]
    assert parse_value("[a, b]") == ["a", "b"] and parse_value("vgg") == "vgg"
    assert parse_value('{"num_groups": 2}') == {"num_groups": 2}


def test_dotted_overrides_and_name_shorthand():
    cfg = resolve({}, ["model=vgg", "model.depth=11", "optim.lr=0.05", "epochs=3"])
    assert cfg["model"]["name"] == "vgg" and cfg["model"]["depth"] == 11
    assert cfg["optim"]["lr"] == 0.05 and cfg["epochs"] == 3
    assert cfg["model"]["norm"] == "bn"  # the vgg default, not mlp's
    cfg = resolve({}, ["model.depth=11", "model=vgg"])  # order does not matter
    assert cfg["model"] == resolve({}, ["model=vgg", "model.depth=11"])["model"]
    nested = resolve({}, ["model=lenet", "model.norm=gn", "model.norm_kwargs.num_groups=2"])
    assert nested["model"]["norm_kwargs"] == {"num_groups": 2}


def test_none_names_the_none_choice_of_string_options():
    cfg = resolve({}, ["model=vgg", "model.norm=none", "data.resize=none"])
    assert cfg["model"]["norm"] == "none" and cfg["data"]["resize"] is None


def test_types_are_coerced_or_rejected():
    cfg = resolve({}, ["optim.lr=1", "epochs=4.0"])
    assert isinstance(cfg["optim"]["lr"], float) and cfg["epochs"] == 4
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        resolve({}, ["epochs=2.5"])
    with pytest.raises(ConfigError, match="true or false"):
        resolve({}, ["deterministic=maybe"])
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        resolve({}, ["optim.lr=fast"])


def test_unknown_keys_list_valid_ones():
    with pytest.raises(ConfigError, match="valid keys: .*batch_size"):
        resolve({}, ["batchsize=3"])
    with pytest.raises(ConfigError, match="unknown optim .sgdd.; valid choices: sgd, adam"):
        resolve({}, ["optim=sgdd"])
    with pytest.raises(ConfigError, match="valid options: .*momentum"):
        resolve({}, ["optim.momentun=0.9"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="device"):
        resolve({}, ["device=tpu"])


def test_config_files(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("epochs: 7\nmodel:\n  name: mlp\n  width: 32\noptim:\n  lr: 1.0e-2\n")
    cfg = resolve(load_config_file(y), ["seed=4"])
    assert cfg["epochs"] == 7 and cfg["model"]["width"] == 32 and cfg["seed"] == 4
    j = tmp_path / "run.json"
    j.write_text('{"data": "mnist1d"}')
    assert resolve(load_config_file(j))["data"]["name"] == "mnist1d"
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ConfigError, match="bad.json"):
        load_config_file(bad)
