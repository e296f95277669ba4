"""The trainers' shared command line (`shusheng.train._loop`): config dataclass -> flags -> config, and `run_main`."""

import argparse
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from shusheng.train import _loop


@dataclass
class _Config:
    name: str = "x"
    steps: int = 3
    lr: float = 0.5
    flag_on: bool = True
    flag_off: bool = False
    n_train: int | None = None
    max_minutes: float | None = None
    resume: str | None = None
    model_args: dict[str, Any] = field(default_factory=lambda: {"depth": 2})
    depths: tuple[int, ...] = (1, 2)
    init: str | None = "pretrained"
    extra: dict = field(default_factory=dict)


def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    kw = {"json_fields": ("model_args",), "optional_types": {"n_train": int, "max_minutes": float},
          "skip": ("extra",), **kw}
    _loop.add_config_arguments(p, _Config, **kw)
    return p


def _parse(argv, **kw) -> _Config:
    return _loop.config_from_args(_Config, _parser(**kw).parse_args(argv), none_strings_for=("init",))


def test_defaults_round_trip():
    assert _parse([]) == _Config()
    actions = {a.dest: a for a in _parser()._actions}
    assert "extra" not in actions
    assert actions["steps"].option_strings == ["--steps"] and actions["steps"].type is int
    assert actions["n_train"].option_strings == ["--n-train"]


def test_bool_flags_are_boolean_optional():
    assert _parse(["--no-flag-on", "--flag-off"]) == _Config(flag_on=False, flag_off=True)
    assert _parse(["--flag-on", "--no-flag-off"]) == _Config()
    actions = {a.dest: a for a in _parser()._actions}
    assert isinstance(actions["flag_on"], argparse.BooleanOptionalAction)
    assert actions["flag_on"].option_strings == ["--flag-on", "--no-flag-on"]
    with pytest.raises(SystemExit):  # a bool flag takes no value (type=bool would read "False" as True)
        _parser().parse_args(["--flag-off", "False"])


def test_none_defaults_take_their_type_from_the_table():
    cfg = _parse(["--n-train", "12", "--max-minutes", "1.5", "--resume", "auto"])
    assert cfg.n_train == 12 and type(cfg.n_train) is int
    assert cfg.max_minutes == 1.5 and type(cfg.max_minutes) is float
    assert cfg.resume == "auto"  # not in the table: str
    with pytest.raises(SystemExit):
        _parser().parse_args(["--n-train", "1.5"])
    # without the table, the same flag is a string
    assert _parse(["--n-train", "12"], optional_types=None).n_train == "12"


def test_typed_and_tuple_flags():
    cfg = _parse(["--steps", "7", "--lr", "1e-3", "--depths", "3,4,5"])
    assert (cfg.steps, cfg.lr, cfg.depths) == (7, 1e-3, (3, 4, 5))
    assert {a.dest: a.help for a in _parser()._actions}["depths"] == "comma-separated integers"


def test_json_fields():
    cfg = _parse(["--model-args", '{"depth": 4, "widths": [1, 2]}'])
    assert cfg.model_args == {"depth": 4, "widths": [1, 2]}
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model-args", "{not json"])
    # the default is a fresh copy per parser: parsing never changes a later config's default
    _parser().parse_args([]).model_args["depth"] = 99
    assert _parse([]).model_args == {"depth": 2}
    helps = {a.dest: a.help for a in _parser(help={"model_args": "JSON dict of model arguments"})._actions}
    assert helps["model_args"] == "JSON dict of model arguments" and helps["steps"] is None


def test_dict_field_needs_json_or_skip():
    with pytest.raises(TypeError, match="extra"):
        _loop.add_config_arguments(argparse.ArgumentParser(), _Config, json_fields=("model_args",))
    with pytest.raises(TypeError, match="model_args"):
        _loop.add_config_arguments(argparse.ArgumentParser(), _Config, skip=("extra",))


@pytest.mark.parametrize("text", ["none", "None", ""])
def test_none_strings_only_for_named_fields(text):
    assert _parse(["--init", text]).init is None
    assert _parse(["--resume", text, "--name", text]).resume == text  # not named: kept as written
    assert _parse(["--init", "other"]).init == "other"
    args = _parser().parse_args(["--init", text])
    assert _loop.config_from_args(_Config, args).init == text  # nothing named


def test_config_from_args_ignores_other_attributes():
    args = _parser().parse_args(["--steps", "2"])
    args.task, args.command = "bridge", "train"  # what `shusheng train TASK` adds
    assert _loop.config_from_args(_Config, args) == _Config(steps=2)


def test_run_main_and_print_metrics(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: calls.append(kw))

    def add(p):
        _loop.add_config_arguments(p, _Config, json_fields=("model_args",), skip=("extra",))

    def run(args):
        return _loop.print_metrics({"steps": _loop.config_from_args(_Config, args).steps, "loss": 0.25})

    assert _loop.run_main("prog", "the doc", add, run, ["--steps", "4"], log_format="%(message)s") == 0
    assert json.loads(capsys.readouterr().out) == {"steps": 4, "loss": 0.25}
    assert calls == [{"level": logging.INFO, "format": "%(message)s"}]
    _loop.run_main("prog", "the doc", add, run, [])
    assert calls[-1] == {"level": logging.INFO, "format": _loop.LOG_FORMAT}
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    with pytest.raises(SystemExit):
        _loop.run_main("prog", "the doc", lambda p: None, run, ["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: prog") and "the doc" in out


def test_trainers_flags():
    """Each trainer's specifics reach its parser: JSON fields, None-typed fields, none-strings, tuples."""
    from shusheng.train import bridge, classify, clip, uniperceiver

    def parse(mod, argv):
        p = argparse.ArgumentParser()
        mod.add_train_arguments(p)
        return mod.config_from_args(p.parse_args(argv))

    cfg = parse(bridge, ["--tower-args", '{"channels": 8}', "--tower-init", "none", "--projector-hidden", "64",
                         "--max-minutes", "2"])
    assert (cfg.tower_args, cfg.tower_init, cfg.projector_hidden, cfg.max_minutes) == ({"channels": 8}, None, 64, 2.0)
    assert parse(bridge, []) == bridge.BridgeTrainConfig()
    cfg = parse(uniperceiver, ["--text-init", "", "--n-train", "5", "--no-hflip", "--backbone-args", "{}"])
    assert (cfg.text_init, cfg.n_train, cfg.hflip, cfg.backbone_args) == (None, 5, False, {})
    assert parse(uniperceiver, []) == uniperceiver.UniPerceiverTrainConfig()
    cfg = parse(clip, ["--depths", "2,2,2,2", "--max-steps", "3", "--no-test-eval", "--dcn-backend", "pytorch"])
    assert (cfg.depths, cfg.max_steps, cfg.test_eval, cfg.dcn_backend) == ((2, 2, 2, 2), 3, False, "pytorch")
    assert parse(clip, []) == clip.ClipConfig()
    cfg = parse(classify, ["--data-dir", "d", "--layer-decay", "0.9", "--max-steps", "4", "--no-ema"])
    assert (cfg.layer_decay, cfg.max_steps, cfg.ema_decay) == (0.9, 4, 0.0)
