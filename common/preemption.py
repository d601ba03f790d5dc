"""Stopping cleanly on a scheduler's signal: SIGTERM, or SIGUSR1 (which SLURM can send ahead of the kill with
``--signal=USR1@SECONDS``).

During training, the first such signal to any rank asks the whole job to stop: every rank finishes its current
optimizer step, the ranks agree on the step at which they stop (an all-reduce of one flag after every step, so
a rank that got the signal late or not at all stops at the same step), a complete checkpoint is written as at
any other step, and every process exits with `PREEMPTED_EXIT_CODE`. Resuming from that checkpoint continues
exactly as if the run had not stopped.

A repeat of the signal while that checkpoint is being written, more than `REPEAT_GRACE_S` after the first,
ends the process at once; the checkpoint being written stays unmarked, so the previous complete one is what
resume takes. Repeats within the grace period count as the same request: launchers such as torchrun pass on
the signal that the scheduler already sent to every process of the job.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from .ranks import largest, rank_and_world

logger = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry". Distinct from our errors (1),
# usage errors (2), deaths by signal (128 + N, e.g. 137 for SIGKILL and 143 for SIGTERM) and timeouts (124), so
# a job script can tell "stopped with a checkpoint, requeue me" from every kind of failure.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_GRACE_S = 2.0
# Set by `python -m common.launch`: where local rank 0 writes its stop message, so that the launcher can exit
# with PREEMPTED_EXIT_CODE too (torchrun itself exits 1 whatever its workers return).
RECORD_ENV = "PHI3V_PREEMPTION_RECORD"


class StopOnSignal(TrainerCallback):
    """Turns SIGTERM/SIGUSR1 during `Trainer.train` into a checkpoint at the next step boundary and a stop.

    `saving` is set by the trainer while it writes a checkpoint; `newest_complete` names the newest complete
    checkpoint for the message of an immediate exit.
    """

    def __init__(self):
        self.signum = 0
        self.received_at: float | None = None
        self.stopped_at_step: int | None = None
        self.saving = False
        self.newest_complete: str | None = None
        self._owner_pid: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self._owner_pid is not None or not _in_main_thread():
            return
        # DataLoader workers forked after this inherit the handler; it ignores the signal in them (the main
        # process stops them), so that a scheduler signalling every process does not kill a worker mid-batch.
        self._owner_pid = os.getpid()
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._owner_pid = None

    def _handle(self, signum, frame):
        if os.getpid() != self._owner_pid:
            return
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.received_at is None:
            self.signum, self.received_at = signum, now
            logger.warning("%s received: finishing this optimizer step, then writing a checkpoint and stopping", name)
            return
        if self.saving and now - self.received_at > REPEAT_GRACE_S:
            previous = self.newest_complete or "no complete checkpoint"
            print(f"{rank_prefix()}{name} again while the checkpoint was being written: stopping now; {previous} is the "
                  "newest complete checkpoint, which --resume_from_checkpoint latest takes", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def on_step_end(self, args, state, control, **kwargs):
        # One tiny all-reduce per optimizer step: what lets every rank stop at the same step.
        signum = largest(self.signum) if self.stopped_at_step is None else 0
        if signum:
            self.stopped_at_step = state.global_step
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True
        return control


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def rank_prefix() -> str:
    rank, world = rank_and_world()
    return f"[rank {rank}] " if world > 1 else ""


def announce_stop(stop: StopOnSignal, checkpoint: Path) -> str:
    """The one line a stopped run ends with; local rank 0 also leaves it where `common.launch` looks."""
    message = (
        f"stopped by {signal.Signals(stop.signum).name} after step {stop.stopped_at_step}: {checkpoint} is complete; run the same "
        f"command with --resume_from_checkpoint latest to continue (exit code {PREEMPTED_EXIT_CODE})"
    )
    record = os.environ.get(RECORD_ENV)
    if record and os.environ.get("LOCAL_RANK", "0") == "0":
        Path(record).write_text(message + "\n", encoding="utf-8")
    return message


__all__ = ["PREEMPTED_EXIT_CODE", "StopOnSignal", "announce_stop", "RECORD_ENV", "STOP_SIGNALS"]
