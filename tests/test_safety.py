"""Untrusted checkpoint files never run code, and a held extension build lock never hangs a run silently."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.checkpoint_files import UnsafeCheckpointFile, check_torch_file, torch_files, weights_only_loads
from common.run_folder import COMPLETE_MARKER, file_sha256

from .recipe_utils import assert_ok, run_script
from .test_reliability import write_jsonl_data

SCRIPT = "finetune_hf_trainer_ucf101.py"


class RunsCommand:
    """What a crafted checkpoint would hold: unpickling it runs a command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def zero2_args(checkpoint, data, out):
    # The default engine of full training (ZeRO-2, ds_configs/zero2.json), two processes.
    return ["--model_name_or_path", checkpoint, "--data_dir", data, "--output_dir", out, "--num_crops", "1",
            "--max_steps", "2", "--save_steps", "1", "--batch_size", "2", "--batch_size_per_gpu", "1",
            "--skip_eval_before", "--skip_eval_after", "--dataloader_num_workers", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def zero2_run(tiny_checkpoint, tmp_path_factory):
    """A ZeRO-2 run stopped after its checkpoint-1, as an interrupted run leaves its folder."""
    tmp_path = tmp_path_factory.mktemp("zero2")
    data = write_jsonl_data(tmp_path / "data")
    out = tmp_path / "out"
    assert_ok(run_script(SCRIPT, zero2_args(tiny_checkpoint, data, out), tmp_path, nproc=2, env={"PHI3V_TEST_STOP_AT_STEP": 1}))
    assert (out / "checkpoint-1" / "global_step1").is_dir() and not (out / "checkpoint-2").exists()
    return tiny_checkpoint, data, out


def test_every_file_of_a_deepspeed_checkpoint_passes_the_weights_only_check(zero2_run):
    checkpoint = zero2_run[2] / "checkpoint-1"
    names = {path.relative_to(checkpoint).as_posix() for path in torch_files(checkpoint)}
    assert {"global_step1/mp_rank_00_model_states.pt", "global_step1/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "scheduler.pt", "rng_state_0.pth"} <= names
    for path in torch_files(checkpoint):
        check_torch_file(path)


def test_a_crafted_pickle_in_a_deepspeed_checkpoint_never_runs(zero2_run, tmp_path):
    tiny_checkpoint, data, run = zero2_run
    out = tmp_path / "out"
    shutil.copytree(run, out)
    checkpoint = out / "checkpoint-1"
    crafted = checkpoint / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    proof = tmp_path / "code-ran"
    # Unpickling runs the command before DeepSpeed looks at what it loaded.
    torch.save({"optimizer_state_dict": RunsCommand(f"touch {proof}")}, crafted)
    # Whoever crafts a checkpoint can also write its manifest: the manifest check does not stop this one.
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    marker["files"][crafted.relative_to(checkpoint).as_posix()] = file_sha256(crafted)
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))
    result = run_script(SCRIPT, [*zero2_args(tiny_checkpoint, data, out), "--resume_from_checkpoint", "latest",
                                 "--allow_pickle_weights"], tmp_path, nproc=2)
    assert not proof.exists(), "the crafted checkpoint's code ran"
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors and all(f"{crafted}: refused to load" in line and "posix.system" in line for line in errors), errors


def test_deepspeeds_own_loader_is_weights_only_during_training(zero2_run, tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint = zero2_run[2] / "checkpoint-1"
    engine = TorchCheckpointEngine()
    with weights_only_loads():
        for path in (checkpoint / "global_step1").glob("*.pt"):
            assert engine.load(str(path), map_location="cpu")
        proof = tmp_path / "code-ran"
        crafted = tmp_path / "mp_rank_00_model_states.pt"
        torch.save({"module": RunsCommand(f"touch {proof}")}, crafted)
        with pytest.raises(pickle.UnpicklingError, match="posix.system"):
            engine.load(str(crafted), map_location="cpu")
    assert not proof.exists()


@pytest.mark.parametrize("payload, reason", [
    (lambda proof: {"state": RunsCommand(f"touch {proof}")}, "posix.system"),
    (lambda proof: {"state": [torch.zeros(2), subprocess.Popen]}, "Popen"),
])
def test_the_check_refuses_code_in_any_torch_file_whatever_the_environment(tmp_path, monkeypatch, payload, reason):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    proof = tmp_path / "code-ran"
    path = tmp_path / "checkpoint-3" / "rng_state.pth"
    path.parent.mkdir()
    torch.save(payload(proof), path)
    with pytest.raises(UnsafeCheckpointFile) as refused:
        check_torch_file(path)
    assert str(refused.value).startswith(f"{path}: refused to load") and reason in str(refused.value)
    assert "\n" not in str(refused.value) and not proof.exists()
