"""Run-folder rules checked in-process: checkpoint rotation, why a checkpoint is set aside, which resumes extend a
run, and the learning rate an extended run continues at."""

import json

import pytest
import torch
from transformers import get_scheduler

from common.training.recipe import continue_schedule
from common.training.run_folder import COMPLETE_MARKER, checkpoint_problems, extension_of, rotate


def checkpoints(folder, steps, run_id="run-a"):
    for step in steps:
        checkpoint = folder / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"run_id": run_id, "global_step": step}))


def left(folder):
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))


@pytest.mark.parametrize(
    "limit, best, kept",
    [
        (2, None, [4, 5]),
        (2, 2, [2, 5]),  # the best and the newest: 2, not 3 (best + the last 2)
        (3, 2, [2, 4, 5]),
        (2, 5, [4, 5]),
        (1, 5, [5]),
        (1, 2, [2, 5]),  # as the HF Trainer: the newest stays too, a resume needs it
    ],
)
def test_save_total_limit_keeps_at_most_that_many_the_best_among_them(tmp_path, limit, best, kept):
    checkpoints(tmp_path, [1, 2, 3, 4, 5])
    checkpoints(tmp_path, [6], run_id="another-run")
    rotate(tmp_path, "run-a", limit, str(tmp_path / f"checkpoint-{best}") if best else None)
    assert left(tmp_path) == kept + [6]


def test_a_marker_less_checkpoint_is_set_aside_for_what_is_really_wrong(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    problems = checkpoint_problems(checkpoint, 1, deepspeed=False)
    assert "trainer_state.json is of step 6, not 4" in problems
    assert "trainer_state.json" not in problems.split(";")[0], problems
    assert problems.startswith("no model weights, optimizer.pt, scheduler.pt, rng_state.pth")
    (checkpoint / "trainer_state.json").write_text('{"global_step": ')
    assert "its trainer_state.json is cut short or not JSON" in checkpoint_problems(checkpoint, 1, deepspeed=False)


def test_only_training_longer_extends_a_run():
    run = {"max_steps": 4, "num_train_epochs": 1.0, "learning_rate": 1e-3}
    assert extension_of(run, {**run, "max_steps": 6}) == "max_steps 4 -> 6"
    assert extension_of(run, {**run, "max_steps": 3}) is None
    assert extension_of(run, {**run, "max_steps": 6, "learning_rate": 2e-3}) is None
    assert extension_of(run, {**run, "max_steps": -1, "num_train_epochs": 2.0}) is None
    by_epochs = {**run, "max_steps": -1}
    assert extension_of(by_epochs, {**by_epochs, "num_train_epochs": 2.0}) == "num_train_epochs 1.0 -> 2.0"
    assert extension_of(by_epochs, {**by_epochs, "num_train_epochs": 0.5}) is None


def test_an_extended_run_trains_its_next_step_at_the_new_schedules_rate():
    def schedule(total):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        return optimizer, get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=total)

    optimizer, scheduler = schedule(4)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    # A resume of unchanged length keeps the very rate it had.
    same_optimizer, same = schedule(4)
    same_optimizer.load_state_dict(optimizer.state_dict())
    same.load_state_dict(scheduler.state_dict())
    assert continue_schedule(same) == [optimizer.param_groups[0]["lr"]] == [same_optimizer.param_groups[0]["lr"]]
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0
    # Resume as the Trainer does: scheduler rebuilt for 6 steps, then both states loaded.
    longer_optimizer, longer = schedule(6)
    longer_optimizer.load_state_dict(optimizer.state_dict())
    longer.load_state_dict(scheduler.state_dict())
    assert longer_optimizer.param_groups[0]["lr"] == 0.0, "step 5 would not train at all"
    assert continue_schedule(longer) == pytest.approx([1e-3 * 2 / 6])
    assert longer_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 6)
    longer_optimizer.step()
    longer.step()
    assert longer_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 1 / 6)
