"""Every TrainingArguments field is exercised by a test, not applicable, or refused at parse time with its reason.

Exercised means: a test or driver under tests/ other than this file sets the option as a command-line flag,
a quoted ``"--<name>"`` token (alone, or as ``"--<name>=value"``), since the recipes take their options from a
command line and every test that parses one or launches a script writes its flags that way. Keyword arguments
(``seed=0``) do not count: the same names belong to other APIs (datasets, generators, plain TrainingArguments in
unit tests). The other two groups live in common/training/trainer_options.py with their reasons. A field that a new
transformers version adds belongs to none of them, and fails here until someone classifies it.
"""

import dataclasses
import itertools
import re

import pytest
from accelerate.parallelism_config import ParallelismConfig
from transformers import TrainingArguments

from common.training.arguments import ArgumentError, FinetuneArguments, parse_args
from common.training.trainer_options import NOT_APPLICABLE, REFUSED

from .conftest import REPO_ROOT

THIS_FILE = __file__
FIELDS = [field.name for field in dataclasses.fields(TrainingArguments)]
# How each refused option is given on a command line; None: it cannot be (argparse has no type for it).
REQUESTS = {
    "label_smoothing_factor": ["--label_smoothing_factor", "0.1"],
    "optim_target_modules": ["--optim_target_modules", "attn"],
    "liger_kernel_config": None,
    "use_cache": ["--use_cache"],
    "auto_find_batch_size": ["--auto_find_batch_size"],
    "bf16_full_eval": ["--bf16_full_eval"],
    "fp16_full_eval": ["--fp16_full_eval"],
    "include_for_metrics": ["--include_for_metrics", "inputs"],
    "batch_eval_metrics": ["--batch_eval_metrics"],
    "eval_do_concat_batches": ["--eval_do_concat_batches", "false"],
    "eval_use_gather_object": ["--eval_use_gather_object"],
    "save_only_model": ["--save_only_model"],
    "save_on_each_node": ["--save_on_each_node"],
    "enable_jit_checkpoint": ["--enable_jit_checkpoint"],
    "push_to_hub": ["--push_to_hub"],
    "remove_unused_columns": ["--remove_unused_columns", "true"],
    "label_names": ["--label_names", "answer"],
    "length_column_name": ["--length_column_name", "tokens"],
    "accelerator_config": ["--accelerator_config", '{"dispatch_batches": true}'],
    "parallelism_config": None,
    "do_eval": ["--do_eval"],
    "do_predict": ["--do_predict"],
}
IN_CODE = {"liger_kernel_config": {"rope": False}, "parallelism_config": ParallelismConfig()}


def exercised() -> set[str]:
    sources = [path.read_text() for path in sorted((REPO_ROOT / "tests").rglob("*.py")) if str(path) != THIS_FILE]
    return {
        name for name in FIELDS
        if any(re.search(r"""["']--%s(?=["'=])""" % re.escape(name), source) for source in sources)
    }


def test_every_trainer_option_is_classified_once():
    tested = exercised()
    groups = {"exercised": tested, "not applicable": set(NOT_APPLICABLE), "refused": set(REFUSED)}
    for (first, a), (second, b) in itertools.combinations(groups.items(), 2):
        assert not a & b, f"{sorted(a & b)} both {first} and {second}"
    unclassified = set(FIELDS) - set().union(*groups.values())
    assert not unclassified, (
        f"TrainingArguments fields nobody has classified: {sorted(unclassified)}. Give each a test that sets it as a "
        "command-line flag, or an entry with its reason in NOT_APPLICABLE or REFUSED (common/training/trainer_options.py)"
    )
    stale = (set(NOT_APPLICABLE) | set(REFUSED)) - set(FIELDS)
    assert not stale, f"no longer TrainingArguments fields: {sorted(stale)}"


def test_reasons_are_one_line_and_say_what_to_do():
    for name, reason in {**NOT_APPLICABLE, **REFUSED}.items():
        assert reason and "\n" not in reason, name
    assert REQUESTS.keys() == REFUSED.keys()
    assert all(reason.startswith(f"--{name}") and ";" in reason for name, reason in REFUSED.items())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_options_stop_at_parse_time_with_their_reason(name, tmp_path, capsys):
    if REQUESTS[name] is None:
        with pytest.raises(ArgumentError) as refused:
            FinetuneArguments(output_dir=str(tmp_path), use_lora=True, **{name: IN_CODE[name]})
        assert str(refused.value) == REFUSED[name]
        return
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv=["--output_dir", str(tmp_path), "--use_lora", *REQUESTS[name]])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {REFUSED[name]}")


def test_an_unreadable_accelerator_config_stops_parsing_with_its_name(tmp_path, capsys):
    missing = tmp_path / "accelerate.json"
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv=["--output_dir", str(tmp_path / "out"), "--use_lora", "--accelerator_config", str(missing)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"--accelerator_config {missing}: not readable JSON" in error[0]


def test_refused_options_at_their_default_or_harmless_values_pass(tmp_path):
    args, = parse_args(argv=["--output_dir", str(tmp_path), "--use_lora", "--label_names", "labels",
                             "--accelerator_config", '{"even_batches": true}', "--remove_unused_columns", "false"])
    assert args.label_names == ["labels"] and args.accelerator_config.even_batches
