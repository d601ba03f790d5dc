"""Under ZeRO-3 a rank whose batch has no image stays in step with a rank that has images, in full and
frozen-vision training (issue 13 item 6): one torchrun launch of tests/drivers/ranks_in_step.py."""

import json
import os
import signal
import subprocess
import sys

import pytest

from .recipe_utils import REPO_ROOT, offline_env

pytestmark = pytest.mark.slow
DRIVER = REPO_ROOT / "tests" / "drivers" / "ranks_in_step.py"
# The launch takes 20-40 s, ~90 s when DeepSpeed first compiles its CPU communication op; a rank left waiting in a
# collective would wait for DeepSpeed's 30-minute timeout.
TIMEOUT_S = 240


def test_text_only_rank_and_image_rank_train_in_step_under_zero3(tiny_checkpoint, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DRIVER),
               str(tiny_checkpoint), str(tmp_path)]
    launch = subprocess.Popen(command, cwd=REPO_ROOT, env=offline_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = launch.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # The workers too: killing torchrun alone would leave them waiting in their collective.
        os.killpg(launch.pid, signal.SIGKILL)
        output, _ = launch.communicate()
    progress = "\n".join(line for line in output.splitlines() if line.startswith("[rank "))
    hung = f"hung, killed after {TIMEOUT_S} s" if launch.returncode == -signal.SIGKILL else f"exit {launch.returncode}"
    assert launch.returncode == 0, f"{hung}; each rank's last lines say where it stopped:\n{progress}\n--- output ---\n{output[-4000:]}"
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for mode in ("full", "frozen_vision"):
        assert ranks[0][mode]["kinds"] == ["text-only", "text-only"] and ranks[1][mode]["kinds"] == ["image", "image"], mode
        assert ranks[0][mode]["tower_calls"] == ranks[1][mode]["tower_calls"] > 0, mode
