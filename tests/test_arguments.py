"""Argument parsing: how library errors reach the user; the environment a run without a launcher needs."""

import os
from dataclasses import dataclass

import pytest

from common.training.arguments import LAUNCHER_VARIABLES, parse_args, set_launcher_environment


@dataclass
class RefusingArguments:
    value: int = 0

    def __post_init__(self):
        raise ValueError("the first line says what\n  - Evaluation strategy: STEPS\n  - Save strategy: EPOCH\n")


def test_library_errors_are_quoted_whole_on_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(RefusingArguments, argv=["--output_dir", str(tmp_path), "--deepspeed", "none"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert error.endswith("error: the first line says what - Evaluation strategy: STEPS - Save strategy: EPOCH")


@pytest.fixture
def unlaunched(monkeypatch):
    """A process no launcher started; whatever the test writes into the launcher's variables is undone after it."""
    for key in LAUNCHER_VARIABLES:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    yield
    for key in LAUNCHER_VARIABLES:
        os.environ.pop(key, None)


@pytest.mark.parametrize(
    "flags, written",
    [
        ([], True),  # full training: the default ZeRO-2
        (["--freeze_vision_model"], True),
        (["--deepspeed", "none"], False),
        (["--use_lora"], False),
        (["--use_qlora", "--deepspeed", "ds_configs/zero2.json"], True),
        (["--fsdp", "--deepspeed", "none"], True),
        (["--use_lora", "--data_dir", "d"], False),  # a script's own option is not this reader's business
        (["--metric", "anls"], True),  # nor taken for an abbreviation of --metric_for_best_model
        (["--lora_rank", "many"], False),  # not parsable: parse_args reports it, nothing is written
    ],
)
def test_the_launcher_environment_is_written_for_a_run_under_deepspeed_or_fsdp_only(unlaunched, flags, written):
    set_launcher_environment(["--output_dir", "o", *flags])
    assert all((key in os.environ) == written for key in LAUNCHER_VARIABLES)
    if written:
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1") and int(os.environ["MASTER_PORT"]) > 0


def test_a_launched_process_keeps_its_environment(unlaunched, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    set_launcher_environment(["--output_dir", "o"])
    assert os.environ["RANK"] == "3" and "MASTER_PORT" not in os.environ


def test_parsing_deepspeed_without_the_environment_says_what_to_call(unlaunched, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv=["--output_dir", str(tmp_path)])
    assert stopped.value.code == 2
    assert "call it before parse_args" in capsys.readouterr().err
    assert "RANK" not in os.environ, "parsing writes no environment"
