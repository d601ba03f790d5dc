"""Stop signals and resume with DataLoader workers, as a cluster job runs: --dataloader_num_workers 2, two ranks
under `python -m common.launch`, LoRA (whose default engine is DDP), DocVQA rows with several accepted answers.

SIGTERM to the launcher, to one rank, and to the whole process group (as SLURM and Kubernetes send it) each end
in exit 75 with a checkpoint in the middle of the first epoch; the resume from the process group's stop reproduces
an uninterrupted run's losses and adapter bit for bit, through an epoch boundary (each epoch draws other answers).
The full modes' default engine, ZeRO-2, is stopped and resumed the same way in test_resume_zero2_with_workers.py.
"""

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from common.training.preemption import PREEMPTED_EXIT_CODE, children_leave_stop_signals

from .recipe_utils import assert_ok, run_script
from .test_reliability import assert_same_weights, start_torchrun, step_losses, stop_by_signal, wait_for, worker_pids

pytestmark = pytest.mark.slow
SCRIPT = "finetune_hf_trainer_docvqa.py"
# 12 rows at a global batch of 2: 6 steps an epoch; 8 steps cross into the second epoch.
TRAIN_ROWS, MAX_STEPS, STEPS_PER_EPOCH = 12, 8, 6


@pytest.fixture(scope="module")
def docvqa_data(tmp_path_factory) -> Path:
    from common.fixtures.synthetic import make_docvqa

    rows = make_docvqa(n=TRAIN_ROWS, seed=2)
    assert sum(len(answers) > 1 for answers in rows["train"]["answers"]) >= TRAIN_ROWS // 3, "the draw must matter"
    path = tmp_path_factory.mktemp("docvqa") / "data"
    rows.save_to_disk(str(path))
    return path


def run_args(checkpoint, data, out) -> list:
    return ["--model_name_or_path", checkpoint, "--dataset_path", data, "--output_dir", out, "--use_lora", "--lora_rank", "4",
            "--num_crops", "1", "--max_steps", MAX_STEPS, "--save_steps", "2", "--batch_size", "2", "--batch_size_per_gpu", "1",
            "--dataloader_num_workers", "2", "--skip_eval_before", "--skip_eval_after", "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--seed", "5", "--logging_steps", "1", "--resume_from_checkpoint", "latest"]


class SlowRows(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, index):
        time.sleep(0.02)
        return index


def test_workers_forked_while_training_leave_stop_signals_to_their_rank():
    # What every DataLoader forked during training (its own, the evaluations') gets from StopOnSignal.
    with children_leave_stop_signals():
        batches = iter(torch.utils.data.DataLoader(SlowRows(), batch_size=2, num_workers=2))
        first = next(batches)
    workers = list(batches._workers)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        # From another process, as a scheduler sends it (torch's worker handler dies of any SIGTERM not from its parent).
        subprocess.run(["kill", f"-{signum.name.removeprefix('SIG')}", *(str(w.pid) for w in workers)], check=True)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    assert torch.cat([first, *batches]).tolist() == list(range(40))
    # The rank itself can still end a worker that does not stop, as torch's DataLoader shutdown does.
    with children_leave_stop_signals():
        batches = iter(torch.utils.data.DataLoader(SlowRows(), batch_size=2, num_workers=1))
        next(batches)
    worker = batches._workers[0]
    worker.terminate()
    worker.join(timeout=10)
    assert worker.exitcode == 0
    del batches
    # Outside the block nothing changes.
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGTERM, signal.SIGUSR1} == set()


def test_answer_draws_follow_seed_epoch_and_index_in_any_process(docvqa_data):
    import datasets

    from common.data.dataset import RecipeDataset
    from finetune_hf_trainer_docvqa import mini_train_example

    rows = datasets.load_from_disk(str(docvqa_data))["train"]
    dataset = RecipeDataset(rows, mini_train_example, "docvqa train", seed=5)
    answer = lambda example: example["messages"][1]["content"]
    by_workers = lambda workers: [answer(e) for e in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)]

    random.seed(0)
    outside = random.getstate()
    first_epoch = [answer(dataset[index]) for index in range(len(dataset))]
    assert random.getstate() == outside, "building an example leaves the random module as it was"
    assert by_workers(2) == first_epoch
    # A resumed run reads the rest of the epoch alone: the same draws.
    assert [answer(dataset[index]) for index in range(5, len(dataset))] == first_epoch[5:]
    dataset.set_epoch(1)
    second_epoch = by_workers(2)
    assert second_epoch == [answer(dataset[index]) for index in range(len(dataset))]
    assert second_epoch != first_epoch, "each epoch draws again"
    # Workers kept from one epoch to the next (--dataloader_persistent_workers) see the new epoch too.
    persistent = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True)
    dataset.set_epoch(0)
    assert [answer(e) for e in persistent] == first_epoch
    dataset.set_epoch(1)
    assert [answer(e) for e in persistent] == second_epoch


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, docvqa_data, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("reference")
    out = tmp_path / "out"
    assert_ok(run_script(SCRIPT, run_args(tiny_checkpoint, docvqa_data, out), tmp_path, nproc=2))
    return out


def signal_launcher(process, out):
    os.kill(process.pid, signal.SIGTERM)


def signal_one_rank(process, out):
    ranks = worker_pids(str(out))
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGTERM)


def signal_process_group(process, out):
    os.killpg(process.pid, signal.SIGTERM)


def stop_with(send, args, out, tmp_path) -> int:
    """SIGTERM by `send` once checkpoint-2 is complete (`stop_by_signal`): the run stops in the first epoch with a
    complete checkpoint of the step it stopped at (returned) and no final adapter."""
    step, _ = stop_by_signal(args, tmp_path, lambda process: send(process, out), out / "checkpoint-2", SCRIPT)
    assert 2 < step < STEPS_PER_EPOCH and (out / f"checkpoint-{step}" / "checkpoint_complete.json").is_file()
    assert not (out / "adapter_model.safetensors").exists()
    return step


@pytest.mark.parametrize("send", [signal_launcher, signal_one_rank], ids=["launcher", "one-rank"])
def test_sigterm_with_workers_to_the_launcher_or_one_rank_stops_every_rank_with_a_checkpoint(tiny_checkpoint, docvqa_data,
                                                                                            tmp_path, send):
    # What follows the stop, the resume, is the same whichever process got the signal; the next test checks it.
    out = tmp_path / "out"
    stop_with(send, run_args(tiny_checkpoint, docvqa_data, out), out, tmp_path)


def test_sigterm_with_workers_to_the_process_group_stops_with_a_checkpoint_and_resume_is_bit_equal(
        tiny_checkpoint, docvqa_data, reference, tmp_path):
    # The signal SLURM and Kubernetes send, which the DataLoader workers get too.
    out = tmp_path / "out"
    args = run_args(tiny_checkpoint, docvqa_data, out)
    step = stop_with(signal_process_group, args, out, tmp_path)

    resumed = run_script(SCRIPT, args, tmp_path, nproc=2)
    assert_ok(resumed)
    assert f"resuming from {out / f'checkpoint-{step}'}" in resumed.stderr
    assert step_losses(out) == step_losses(reference) and len(step_losses(out)) == MAX_STEPS
    assert_same_weights(reference, out, "adapter_model.safetensors")


def test_a_stop_signal_during_the_evaluation_before_training_ends_every_rank_with_exit_75(tiny_checkpoint, docvqa_data,
                                                                                           tmp_path):
    # Outside Trainer.train there is no step to finish: the evaluation's workers must still leave the signal to
    # their rank, and every rank ends with the one line and exit 75 instead of dying of the signal.
    out = tmp_path / "out"
    args = [arg for arg in run_args(tiny_checkpoint, docvqa_data, out) if arg != "--skip_eval_before"]
    # Each rank marks the start of its generation, then sleeps far longer than any scheduling delay of this test:
    # the signal lands in the evaluation however loaded the machine is, and interrupts the sleep.
    generating = tmp_path / "generating"
    env = {"PHI3V_TEST_SLOW_GENERATION": "120", "PHI3V_TEST_GENERATING": str(generating)}
    process = start_torchrun(args, tmp_path, env, launcher="common.training.launch", script=SCRIPT)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(process.stdout.fileno(), 4096).decode(errors="replace"), "")))
    reader.start()
    try:
        wait_for(lambda: all(Path(f"{generating}.rank{rank}").exists() for rank in (0, 1)), process)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        reader.join(timeout=30)
    output = "".join(chunks)
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-4000:]
    assert "DataLoader worker" not in output and "Traceback" not in output, output[-4000:]
    stop_line = output.strip().splitlines()[-1]
    assert stop_line.startswith("stopped by SIGTERM before or after training: "), stop_line
    assert not (out / "eval_before.json").exists() and not (out / "run.lock").exists()
