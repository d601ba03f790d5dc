"""The run folder object and the one Trainer internal the recipes override."""

import inspect
import logging
from types import SimpleNamespace

import pytest
from transformers import Trainer

from common.model.official_files import TOWER_PREFIX
from common.training.recipe import TRAINER_INTERNALS, UNUSED_TOWER_KEYS, RecipeTrainer
from common.training.run_folder import COMPLETE_MARKER, RunFolder


@pytest.mark.parametrize("name", sorted(TRAINER_INTERNALS))
def test_the_trainer_internals_used_have_the_signatures_they_were_read_against(name):
    # A transformers upgrade that changes one must be read again before RecipeTrainer's use of it (and the run
    # folder's protocol behind the checkpoint save) is trusted.
    assert str(inspect.signature(getattr(Trainer, name))) == TRAINER_INTERNALS[name]


def test_recipe_trainer_overrides_only_the_checkpoint_save():
    private = {name for name in vars(RecipeTrainer) if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)}
    assert private == {"_save_checkpoint"}


def test_the_end_of_training_keeps_only_the_best_of_this_runs_checkpoints(tmp_path):
    for step, run in ((1, "mine"), (2, "mine"), (3, "other"), (4, "mine")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text(f'{{"run_id": "{run}"}}')
    folder = RunFolder(SimpleNamespace(output_dir=str(tmp_path), save_total_limit=1))
    folder.claim_made = SimpleNamespace(run_id="mine")
    folder.keep_only_best(str(tmp_path / "checkpoint-2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_loading_a_checkpoint_back_warns_only_of_keys_other_than_the_unused_tower_tensors():
    def warned(names):
        record = logging.LogRecord("transformers.trainer", logging.WARNING, __file__, 1,
                                   f"There were unexpected keys in the checkpoint model loaded: {names}.", None, None)
        return record.getMessage() if UNUSED_TOWER_KEYS.filter(record) else None

    tower = f"{TOWER_PREFIX}post_layernorm.weight"
    assert warned([tower]) is None
    assert warned([tower, "lm_head.bias"]) == "There were unexpected keys in the checkpoint model loaded: ['lm_head.bias']."


def test_claiming_changes_no_checkpoint_and_clearing_removes_only_the_interrupted_write(tiny_checkpoint, tmp_path):
    from common.training.arguments import parse_args
    from common.training.run_folder import begin_checkpoint, finish_checkpoint, hash_parts, part_files

    out = tmp_path / "out"
    rows = [{"images": [], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}]

    def run_folder(*flags):
        args, = parse_args(argv=["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(out), "--deepspeed", "none", *flags])
        folder = RunFolder(args)
        folder.lock()
        folder.move_previous_run_aside()
        return folder

    first = run_folder()
    claim = first.claim(rows)
    complete, interrupted = out / "checkpoint-1", out / "checkpoint-2"
    begin_checkpoint(complete, claim, 1)
    (complete / "trainer_state.json").write_text("{}")
    finish_checkpoint(complete, claim, 1, hash_parts(complete, part_files(complete)))
    begin_checkpoint(interrupted, claim, 2)
    first.release()

    resumed = run_folder("--resume_from_checkpoint", "latest")
    assert resumed.claim(rows).checkpoint == str(complete) and interrupted.is_dir()
    resumed.clear_interrupted_checkpoints()
    assert not interrupted.exists() and complete.is_dir() and resumed.claim_made.run_id == claim.run_id
    resumed.release()
