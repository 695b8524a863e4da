"""Training and repair settings have one default: the command-line options are generated from the library's
settings dataclasses (auditkit.setting, cli.options.setting_options)."""

import dataclasses

import click
import click.testing
import pytest

from auditkit.cli import cli
from auditkit.cli.options import setting_options, settings_of
from auditkit.errors import BadInput
from auditkit.repair.retrain import Retraining
from auditkit.setting import setting
from auditkit.train.esd import ESDConfig
from auditkit.train.finetune import FinetuneConfig


def _params(command: str) -> dict:
    return {p.name: p for p in cli.commands[command].params}


@pytest.mark.parametrize("command,cls,renamed", [
    ("finetune", FinetuneConfig, {}),
    ("align", ESDConfig, {}),
    ("repair", Retraining, {"steps": "train_steps", "batch": "train_batch"}),
])
def test_each_commands_training_options_are_the_librarys_settings(command, cls, renamed):
    params = _params(command)
    on_the_command_line = [f for f in dataclasses.fields(cls) if "help" in f.metadata
                           and renamed.get(f.name, f.name) in params]
    assert len(on_the_command_line) >= 6
    for f in on_the_command_line:
        p = params[renamed.get(f.name, f.name)]
        assert p.default == f.default and p.help == f.metadata["help"], f.name
        if "choices" in f.metadata:
            assert list(p.type.choices) == list(f.metadata["choices"])


@dataclasses.dataclass(frozen=True)
class Toy:
    steps: int = setting(400, "training steps", flag="train-steps")
    lr: float | None = setting(None, "learning rate")
    mode: str = setting("a", "mode", choices=("a", "b"))

    def __post_init__(self):
        if self.steps < 1:
            raise BadInput(None, "--train-steps must be >= 1")


def test_generated_options_parse_into_the_dataclass():
    names = ("steps", "lr", "mode")
    seen = {}

    @click.command()
    @setting_options(Toy, names)
    def cmd(**params):
        seen["toy"] = settings_of(Toy, names, params)
        seen["left"] = params

    runner = click.testing.CliRunner()
    assert runner.invoke(cmd, []).exit_code == 0 and seen["toy"] == Toy() and seen["left"] == {}
    assert runner.invoke(cmd, ["--train-steps", "7", "--lr", "0.5", "--mode", "b"]).exit_code == 0
    assert seen["toy"] == Toy(steps=7, lr=0.5, mode="b")
    assert runner.invoke(cmd, ["--mode", "c"]).exit_code == 2  # not a choice
    assert runner.invoke(cmd, ["--steps", "7"]).exit_code == 2  # the flag is --train-steps
    res = runner.invoke(cmd, ["--train-steps", "0"])
    assert isinstance(res.exception, BadInput) and "--train-steps" in str(res.exception)


def test_retraining_refuses_bad_values_in_one_line():
    for kwargs, flag in (({"rank": 0}, "--rank"), ({"steps": 0}, "--train-steps"), ({"lr": float("nan")}, "--lr"),
                         ({"batch": 0}, "--train-batch"), ({"alpha": -1.0}, "--alpha"), ({"seed": -1}, "--seed")):
        with pytest.raises(BadInput) as exc:
            Retraining(**kwargs)
        assert flag in str(exc.value) and "\n" not in str(exc.value)
