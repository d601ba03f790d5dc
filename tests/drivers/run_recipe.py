"""Runs a recipe script with test-only observers attached to its Trainer (used under torchrun by the tests).

    python tests/drivers/run_recipe.py finetune_hf_trainer_docvqa.py ARGS...

PHI3V_TEST_DIGEST_DIR: at the end of training every rank writes rank{R}.json, a hash of each of its weights,
so a test can prove that the ranks trained in sync.
PHI3V_TEST_STOP_AT_STEP: stop training right after that optimiser step (a checkpoint is saved first), as an
interrupted run would.
PHI3V_TEST_SLOW_STEPS: sleep that many seconds after each step, so a test can kill the run at a chosen point.
PHI3V_TEST_DIE_IN_SAVE_AT_STEP: rank 0 SIGKILLs itself in the middle of writing that step's checkpoint (weights
and optimizer written, RNG state and trainer state not yet).
PHI3V_TEST_SLOW_SAVE=STEP:SECONDS: every checkpoint from that step on sleeps that long in the middle of its write
(same point), so a test can signal the run while it saves.
PHI3V_TEST_SLOW_GENERATION: sleep that many seconds before each generated batch, so a test can signal the run
during an evaluation; each rank first creates the file PHI3V_TEST_GENERATING (if set) with its rank in the name,
so the test signals while the sleep is on rather than guessing from the output.
"""

import hashlib
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import common.training.recipe  # noqa: E402


class WeightDigest(TrainerCallback):
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def on_train_end(self, args, state, control, model=None, **kwargs):
        digests = {
            name: hashlib.sha256(parameter.detach().float().cpu().numpy().tobytes()).hexdigest()
            for name, parameter in model.named_parameters()
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{args.process_index}.json").write_text(json.dumps(digests))


class StopAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


class SlowSteps(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def die_in_save_at(step: int):
    original = common.training.recipe.RecipeTrainer._save_rng_state

    def save_rng_state(self, output_dir):
        if self.state.global_step == step and self.args.process_index == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)

    common.training.recipe.RecipeTrainer._save_rng_state = save_rng_state


original_build_trainer = common.training.recipe.build_trainer


def build_trainer_with_observers(*args, **kwargs):
    trainer = original_build_trainer(*args, **kwargs)
    if os.environ.get("PHI3V_TEST_DIGEST_DIR"):
        trainer.add_callback(WeightDigest(Path(os.environ["PHI3V_TEST_DIGEST_DIR"])))
    if os.environ.get("PHI3V_TEST_STOP_AT_STEP"):
        trainer.add_callback(StopAtStep(int(os.environ["PHI3V_TEST_STOP_AT_STEP"])))
    if os.environ.get("PHI3V_TEST_SLOW_STEPS"):
        trainer.add_callback(SlowSteps(float(os.environ["PHI3V_TEST_SLOW_STEPS"])))
    return trainer


def slow_save_from(step: int, seconds: float):
    original = common.training.recipe.RecipeTrainer._save_rng_state

    def save_rng_state(self, output_dir):
        if self.state.global_step >= step:
            time.sleep(seconds)
        return original(self, output_dir)

    common.training.recipe.RecipeTrainer._save_rng_state = save_rng_state


def slow_generation(seconds: float):
    from common.model.modeling_phi3v import Phi3VForCausalLM

    original = Phi3VForCausalLM.generate

    def generate(self, *args, **kwargs):
        if os.environ.get("PHI3V_TEST_GENERATING"):
            Path(f"{os.environ['PHI3V_TEST_GENERATING']}.rank{os.environ.get('RANK', '0')}").touch()
        time.sleep(seconds)
        return original(self, *args, **kwargs)

    Phi3VForCausalLM.generate = generate


if os.environ.get("PHI3V_TEST_SLOW_GENERATION"):
    slow_generation(float(os.environ["PHI3V_TEST_SLOW_GENERATION"]))
if os.environ.get("PHI3V_TEST_DIE_IN_SAVE_AT_STEP"):
    die_in_save_at(int(os.environ["PHI3V_TEST_DIE_IN_SAVE_AT_STEP"]))
if os.environ.get("PHI3V_TEST_SLOW_SAVE"):
    slow_step, slow_seconds = os.environ["PHI3V_TEST_SLOW_SAVE"].split(":")
    slow_save_from(int(slow_step), float(slow_seconds))


common.training.recipe.build_trainer = build_trainer_with_observers
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
