"""Argument parsing: how library errors reach the user."""

from dataclasses import dataclass

import pytest

from common.training.arguments import parse_args


@dataclass
class RefusingArguments:
    value: int = 0

    def __post_init__(self):
        raise ValueError("the first line says what\n  - Evaluation strategy: STEPS\n  - Save strategy: EPOCH\n")


def test_library_errors_are_quoted_whole_on_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(RefusingArguments, argv=["--output_dir", str(tmp_path)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert error.endswith("error: the first line says what - Evaluation strategy: STEPS - Save strategy: EPOCH")
