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

from common.model.checkpoint_files import UnsafeCheckpointFile, check_torch_file, torch_files, weights_only_loads
from common.training.run_folder import COMPLETE_MARKER, file_sha256

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


@pytest.mark.slow
def test_every_file_of_a_deepspeed_checkpoint_passes_the_weights_only_check(zero2_run):
    checkpoint = zero2_run[2] / "checkpoint-1"
    names = {path.relative_to(checkpoint).as_posix() for path in torch_files(checkpoint)}
    assert {"global_step1/mp_rank_00_model_states.pt", "global_step1/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "scheduler.pt", "rng_state_0.pth"} <= names
    for path in torch_files(checkpoint):
        check_torch_file(path)


@pytest.mark.slow
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


@pytest.mark.slow
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


HOLD_LOCK = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"


@pytest.fixture
def build_lock(tmp_path, monkeypatch):
    """A private extensions folder whose deepspeed_shm_comm/lock is left by an earlier build, as torch leaves it."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    lock = tmp_path / "torch_extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    return lock


@pytest.fixture
def holder(build_lock):
    """Start a process that holds the build lock, as a build in progress does."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(build_lock)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_lock_file_without_a_holder_is_taken_over_silently(build_lock, caplog):
    from common.training.build_lock import check_build_locks

    check_build_locks()
    assert not caplog.records and build_lock.is_file()


def test_a_build_in_progress_is_named_and_waited_for(build_lock, holder, caplog):
    from common.training.build_lock import check_build_locks

    check_build_locks()
    assert f"{build_lock} is held by process {holder.pid}, which is building DeepSpeed's deepspeed_shm_comm op" in caplog.text


def test_a_stopped_build_stops_the_run_at_parse_time_naming_the_lock_and_its_holder(build_lock, holder, tmp_path, monkeypatch,
                                                                                    capsys):
    from common.training.arguments import parse_args

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29581"}.items():
        monkeypatch.setenv(name, value)
    os.kill(holder.pid, signal.SIGSTOP)
    deadline = time.time() + 10
    while Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "Tt" and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(SystemExit) as stop:
        parse_args(argv=["--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--deepspeed",
                         "ds_configs/zero2.json"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"{build_lock} is held by process {holder.pid}" in error and f"kill {holder.pid}" in error
