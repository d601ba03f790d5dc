"""One run per output folder: the lock taken before any data is read, and what a second start is told."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from common.training.run_folder import LOCK_NAME, RunFolderError, _held_locks, _process_start, release_lock, take_lock

from .recipe_utils import DRIVER, REPO_ROOT, offline_env
from .test_reliability import kill_args, run_main, write_jsonl_data


def holder(path):
    return json.loads(path.read_text())


@pytest.fixture
def folder(tmp_path):
    yield tmp_path / "out"
    for lock in [lock for lock in _held_locks if str(lock).startswith(str(tmp_path))]:
        release_lock(lock, _held_locks[lock])


def test_a_live_holder_is_refused_by_name_and_the_lock_goes_with_its_process(folder):
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                              "from common.training.run_folder import take_lock; from pathlib import Path; "
                              "take_lock(Path(sys.argv[2]), 'aaaaaaaaaaaa'); print('held', flush=True); time.sleep(60)",
                              str(REPO_ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        lock = folder / LOCK_NAME
        written = holder(lock)
        assert written["run_id"] == "aaaaaaaaaaaa" and written["pid"] == child.pid and written["host"] == socket.gethostname()
        with pytest.raises(RunFolderError) as refused:
            take_lock(folder, "bbbbbbbbbbbb")
        message = str(refused.value)
        assert f"{folder} is in use by run aaaaaaaaaaaa (pid {child.pid} on {socket.gethostname()}, since {written['since']})" in message
        assert "\n" not in message and holder(lock)["run_id"] == "aaaaaaaaaaaa"
    finally:
        child.terminate()
        child.wait()
    # Ended by a signal, it could not remove its lock: this host sees the pid gone and takes over.
    assert (folder / LOCK_NAME).is_file()
    mine = take_lock(folder, "cccccccccccc")
    assert holder(folder / LOCK_NAME)["run_id"] == "cccccccccccc"
    release_lock(folder / LOCK_NAME, mine)
    assert not (folder / LOCK_NAME).exists()


def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(folder, caplog):
    folder.mkdir()
    # Our parent is alive, but it is not the process that took this lock: its start time differs.
    (folder / LOCK_NAME).write_text(json.dumps({"run_id": "dddddddddddd", "host": socket.gethostname(), "pid": os.getppid(),
                                                "started_at": "1", "since": "2026-01-01T00:00:00+00:00"}))
    take_lock(folder, "eeeeeeeeeeee")
    assert holder(folder / LOCK_NAME)["run_id"] == "eeeeeeeeeeee"
    assert "was claimed by run dddddddddddd" in caplog.text and "no longer running: taking it over" in caplog.text


def test_a_lock_from_another_host_is_refused_with_the_file_to_delete(folder):
    folder.mkdir()
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"run_id": "ffffffffffff", "host": "node-that-is-not-this-one", "pid": 1,
                                "started_at": None, "since": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(RunFolderError) as refused:
        take_lock(folder, "gggggggggggg")
    message = str(refused.value)
    assert "in use by run ffffffffffff (pid 1 on node-that-is-not-this-one" in message
    assert f"if that run is really gone, delete {lock}" in message
    assert holder(lock)["run_id"] == "ffffffffffff"


def test_an_empty_lock_is_waited_for_then_refused(folder):
    folder.mkdir()
    (folder / LOCK_NAME).touch()
    started = time.monotonic()
    with pytest.raises(RunFolderError, match="names no run"):
        take_lock(folder, "hhhhhhhhhhhh")
    assert time.monotonic() - started >= 1.5
    assert _process_start(os.getpid()) is not None


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_an_output_dir_on_the_base_model_folder_is_refused_and_the_model_is_untouched(tiny_checkpoint, tmp_path, capsys, where):
    base = tmp_path / "runs" / "base"
    shutil.copytree(tiny_checkpoint, base)
    before = sorted(p.name for p in base.iterdir())
    out = {"same": base, "inside": base / "out", "containing": tmp_path / "runs"}[where]
    data = write_jsonl_data(tmp_path / "data")
    code, stderr = run_main("finetune_hf_trainer_ucf101", ["--model_name_or_path", base, "--data_dir", data, "--output_dir", out,
                                                           "--overwrite_output_dir", "--deepspeed", "none"], capsys)
    relation = {"same": "is", "inside": "is inside", "containing": "contains"}[where]
    assert code == 1 and f"--output_dir {out} {relation} the base model folder --model_name_or_path {base}" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in base.iterdir()) == before


# ------------------------------------------------------------------------------------------------------------
# Two launches at once, then the winner's run extended


def launch(args, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DRIVER),
               "finetune_hf_trainer_ucf101.py", *map(str, args)]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=offline_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.fixture(scope="module")
def raced(tiny_checkpoint, tmp_path_factory):
    """Two 2-process launches into one folder at the same instant: (the folder, the data, both outputs)."""
    tmp_path = tmp_path_factory.mktemp("raced")
    data = write_jsonl_data(tmp_path / "data")
    out = tmp_path / "out"
    args = [*kill_args(tiny_checkpoint, data, out), "--max_steps", "4", "--save_steps", "2"]
    first, second = launch(args, tmp_path), launch(args, tmp_path)
    results = [(process.communicate(timeout=600)[0], process.returncode) for process in (first, second)]
    return out, data, results


def test_two_starts_at_the_same_instant_one_trains_the_other_names_it(raced):
    out, _, results = raced
    assert sorted(code for _, code in results) == [0, 1], [output[-3000:] for output, _ in results]
    (_, _), (refused, _) = sorted(results, key=lambda result: result[1])
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    errors = [line for line in refused.splitlines() if "error:" in line]
    assert errors and all(f"{out} is in use by run {run_id} (pid " in line for line in errors), refused[-3000:]
    assert "Running training" not in refused
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert not (out / LOCK_NAME).exists()


def test_resume_with_a_larger_max_steps_extends_the_run_and_other_changes_stay_refused(raced, tiny_checkpoint, tmp_path, capsys):
    out, data, _ = raced
    longer = [*kill_args(tiny_checkpoint, data, out), "--max_steps", "6", "--save_steps", "2", "--resume_from_checkpoint", "latest"]
    code, stderr = run_main("finetune_hf_trainer_ucf101", [*longer, "--learning_rate", "2e-3"], capsys)
    assert code == 1 and "trained with other settings (learning_rate 0.001 -> 0.002, max_steps 4 -> 6)" in stderr
    shorter = [*kill_args(tiny_checkpoint, data, out), "--max_steps", "3", "--resume_from_checkpoint", "latest"]
    code, stderr = run_main("finetune_hf_trainer_ucf101", shorter, capsys)
    assert code == 1 and "trained with other settings (max_steps 4 -> 3)" in stderr

    result = launch(longer, tmp_path)
    output = result.communicate(timeout=600)[0]
    assert result.returncode == 0, output[-4000:]
    assert f"resuming from {out / 'checkpoint-4'}" in output and "extending run" in output
    assert "extended run (max_steps 4 -> 6): step 4 of 6; the learning-rate schedule is rebuilt for 6 steps" in output
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["max_steps"] == 6
    # Steps 1-4 trained on the 4-step linear decay; steps 5 and 6 at the 6-step one's rates (not 0, the old end).
    rates = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "loss" in entry}
    assert rates[4] == pytest.approx(1e-3 / 4) and rates[5] == pytest.approx(1e-3 * 2 / 6) and rates[6] == pytest.approx(1e-3 / 6)
    record = json.loads((out / "run.json").read_text())
    assert record["identity"]["max_steps"] == 6
    assert [(entry["changed"], entry["from_checkpoint"]) for entry in record["extensions"]] == [({"max_steps": [4, 6]}, "checkpoint-4")]
