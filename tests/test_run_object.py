"""The run folder object and the one Trainer internal the recipes override."""

import inspect
from types import SimpleNamespace

from transformers import Trainer

from common.recipe import SAVE_CHECKPOINT_SIGNATURE, RecipeTrainer
from common.run_folder import COMPLETE_MARKER, RunFolder


def test_the_overridden_trainer_internal_has_the_signature_it_was_read_against():
    # A transformers upgrade that changes Trainer._save_checkpoint must be read again before RecipeTrainer's
    # override (and the run folder's protocol behind it) is trusted.
    assert str(inspect.signature(Trainer._save_checkpoint)) == SAVE_CHECKPOINT_SIGNATURE


def test_recipe_trainer_overrides_one_private_trainer_method():
    private = {name for name in vars(RecipeTrainer) if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)}
    assert private <= {"_save_checkpoint", "_save", "_get_train_sampler", "_issue_warnings_after_load"}


def test_the_end_of_training_keeps_only_the_best_of_this_runs_checkpoints(tmp_path):
    for step, run in ((1, "mine"), (2, "mine"), (3, "other"), (4, "mine")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text(f'{{"run_id": "{run}"}}')
    folder = RunFolder(SimpleNamespace(output_dir=str(tmp_path), save_total_limit=1))
    folder.claim_made = SimpleNamespace(run_id="mine")
    folder.keep_only_best(str(tmp_path / "checkpoint-2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
