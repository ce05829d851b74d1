from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from grpo.config import ConfigError, cli, load_config, save_config


@dataclass(kw_only=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Reward:
    name: str
    weight: float = 1.0


@dataclass(kw_only=True)
class Stage:
    lr: float = 1e-3
    batch_size: int = 8
    group_size: int = 4
    mode: Literal["a", "b"] = "a"
    resume_from: Optional[str] = None
    bf16: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    rewards: list[Reward] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.batch_size % self.group_size:
            raise ConfigError("batch_size", f"must be divisible by group_size ({self.batch_size} % {self.group_size} != 0)")


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_recipe_and_overrides(tmp_path):
    p = write(tmp_path, "lr: 3e-4\nsampling: {temperature: 0.5}\nrewards: [{name: accuracy, weight: 2}]\n")
    cfg = load_config(Stage, p, ["sampling.top_k=5", "mode=b", "resume_from=latest", "extra.x=1", "sampling.stop=['</s>']"])
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert load_config(Stage, None, ["lr=3e-4"]).lr == 3e-4
    assert cfg.sampling == Sampling(temperature=0.5, top_k=5, stop=["</s>"])
    assert cfg.rewards == [Reward(name="accuracy", weight=2.0)]
    assert cfg.mode == "b" and cfg.resume_from == "latest" and cfg.extra == {"x": 1.0}


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["lrr=1"], "lrr", "allowed keys of Stage"),
        (["sampling.temp=1"], "sampling.temp", "allowed keys of Sampling"),
        (["batch_size=2.5"], "batch_size", "expected an integer"),
        (["lr=fast"], "lr", "expected a number"),
        (["bf16=yes please"], "bf16", "expected true or false"),
        (["mode=c"], "mode", "must be one of 'a', 'b'"),
        (["batch_size=10"], "batch_size", "divisible by group_size"),
        (["rewards=[{weight: 1}]"], "rewards[0]", "name"),
        (["lr"], "lr", "key=value"),
        (["lr.x=1"], "lr", "expected a number"),
        (["lr=1", "lr.x=1"], "lr", "not a section"),
    ],
)
def test_errors_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(Stage, None, overrides)
    assert e.value.key == key
    assert fragment in str(e.value)


def test_nested_post_init_error_is_prefixed():
    @dataclass(kw_only=True)
    class Outer:
        inner: Stage = field(default_factory=Stage)

    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, ["inner.batch_size=3"])
    assert e.value.key == "inner.batch_size"


def test_save_roundtrip(tmp_path):
    cfg = load_config(Stage, None, ["rewards=[{name: fmt}]", "sampling.top_k=3"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Stage, tmp_path / "c.yaml") == cfg


def test_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli(Stage, "demo", ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "sampling.temperature : float = 1.0" in out
    with pytest.raises(SystemExit) as e:
        cli(Stage, "demo", ["nope=1"])
    assert e.value.code == 2
    assert "config error: nope: unknown key" in capsys.readouterr().err


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_config(Stage, tmp_path / "absent.yaml")


def test_help_shows_the_parents_nested_defaults(capsys):
    @dataclass(kw_only=True)
    class FromCheckpoint:
        sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.6))

    with pytest.raises(SystemExit):
        cli(FromCheckpoint, "demo", ["--help"])
    assert "sampling.temperature : float = 0.6" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["yes", "no", "on", "off", "y", "Yes", "OFF"])
def test_booleans_are_strict_in_overrides_and_recipes(tmp_path, text):
    with pytest.raises(ConfigError) as e:
        load_config(Stage, None, [f"bf16={text}"])
    assert e.value.key == "bf16" and "expected true or false" in str(e.value) and repr(text) in str(e.value)
    with pytest.raises(ConfigError, match=rf"^bf16: expected true or false .*got '{text}'$"):
        load_config(Stage, write(tmp_path, f"bf16: {text}\n"))
    assert load_config(Stage, None, [f"resume_from={text}"]).resume_from == text  # a string stays a string


def test_true_false_still_parse():
    assert load_config(Stage, None, ["bf16=true"]).bf16 is True
    assert load_config(Stage, None, ["bf16=False"]).bf16 is False
    assert load_config(Stage, None, ["sampling.stop=[yes, 'no']"]).sampling.stop == ["yes", "no"]
