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

The stop signals are the rank's alone: processes forked while training (DataLoader workers, of training and of
the evaluations during training) never act on them (`children_leave_stop_signals`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from ..ranks import largest, rank_prefix

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
        self._children = contextlib.ExitStack()

    def on_train_begin(self, args, state, control, **kwargs):
        if self._owner_pid is not None or not _in_main_thread():
            return
        self._owner_pid = os.getpid()
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._children.enter_context(children_leave_stop_signals())
        if args.dataloader_num_workers and args.dataloader_multiprocessing_context not in (None, "fork"):
            logger.warning(
                "--dataloader_multiprocessing_context %s: DataLoader workers not started by fork die of a SIGTERM sent to "
                "the whole job, which ends the run without a checkpoint; leave the option out to stop cleanly",
                args.dataloader_multiprocessing_context,
            )

    def on_train_end(self, args, state, control, **kwargs):
        self._children.close()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._owner_pid = None

    def _handle(self, signum, frame):
        if os.getpid() != self._owner_pid:
            # A forked child before its stop signals were blocked (forked outside children_leave_stop_signals).
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

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at_step is not None:
            # The checkpoint to resume from is written: the resumed run loads the best checkpoint when it really
            # ends, so this one forgets it (its record stays in the checkpoints' trainer_state.json) and the
            # Trainer does not load it back now.
            state.best_model_checkpoint = None

    def on_step_end(self, args, state, control, **kwargs):
        # One tiny all-reduce per optimizer step: what lets every rank stop at the same step.
        signum = largest(self.signum) if self.stopped_at_step is None else 0
        if signum:
            self.stopped_at_step = state.global_step
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True
        return control


# How many `children_leave_stop_signals` blocks are open; the fork hooks below act only while one is.
_leaving_depth = 0
_mask_before_fork = threading.local()


@contextlib.contextmanager
def children_leave_stop_signals():
    """Processes forked from this one inside the block never act on SIGTERM or SIGUSR1 sent to them by anyone but
    this process: they start with both blocked, and a thread of theirs ends them quietly on a SIGTERM from this
    process (what torch's DataLoader sends a worker that does not stop), discarding any other.

    Why: a SLURM or Kubernetes stop, and torchrun passing one on, signals every process of the job. A DataLoader
    worker (of training, of an evaluation, of predict) installs torch's C handler for SIGTERM, which re-raises it
    and kills the worker; the rank's SIGCHLD handler then raises "DataLoader worker (pid N) is killed by signal:
    Terminated" in the middle of the step, and no checkpoint is written. Blocked from the fork on, the signal
    cannot reach a worker at any moment (ignoring it in a worker_init_fn would leave the time before that call
    open); the rank handles it and shuts its workers down as usual when their DataLoader is done.

    Only children made by `os.fork` are covered: DataLoader workers under the default start method on Linux
    ("fork"), not under --dataloader_multiprocessing_context spawn or forkserver.
    """
    global _leaving_depth
    _leaving_depth += 1
    try:
        yield
    finally:
        _leaving_depth -= 1


def _block_stop_signals_before_fork() -> None:
    if _leaving_depth:
        _mask_before_fork.mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _unblock_in_parent_after_fork() -> None:
    # A signal that came during the fork was held for this process; unblocking delivers it here.
    mask = getattr(_mask_before_fork, "mask", None)
    if mask is not None:
        _mask_before_fork.mask = None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _leave_stop_signals_in_child() -> None:
    if getattr(_mask_before_fork, "mask", None) is None:
        return
    _mask_before_fork.mask = None
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name="stop-signals", daemon=True).start()


def _exit_on_sigterm_from(parent: int) -> None:
    """Takes the stop signals this child holds blocked: a SIGTERM from `parent` ends it with exit code 0, as
    torch's own worker handler does; any other is dropped."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


os.register_at_fork(
    before=_block_stop_signals_before_fork,
    after_in_parent=_unblock_in_parent_after_fork,
    after_in_child=_leave_stop_signals_in_child,
)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def announce_stop(stop: StopOnSignal, checkpoint: Path) -> str:
    """The one line a stopped run ends with; local rank 0 also leaves it where `common.training.launch` looks."""
    message = (
        f"stopped by {signal.Signals(stop.signum).name} after step {stop.stopped_at_step}: {checkpoint} is complete; run the same "
        f"command with --resume_from_checkpoint latest to continue (exit code {PREEMPTED_EXIT_CODE})"
    )
    _record_for_launcher(message)
    return message


class StoppedBySignal(Exception):
    """SIGTERM or SIGUSR1 outside `Trainer.train`, where there is no optimizer step to finish."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    # Launchers pass on the signal the scheduler already sent to every process: the repeat must not interrupt
    # the exit this one starts.
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    raise StoppedBySignal(signum)


def stop_signals_end_the_run(main):
    """Wrap a script's main: a stop signal before or after training (the validation pass, the evaluations before
    and after it, the final save) ends every process with `PREEMPTED_EXIT_CODE` and one line, as one during
    training does after its checkpoint, instead of the signal's default death (which also killed the evaluations'
    DataLoader workers first); `StopOnSignal` takes the signals over for `Trainer.train`. Nothing half-done is
    kept: the final save goes through a staging folder, and the newest complete checkpoint stays what resume
    takes. Every rank must get the signal (a scheduler's stop, or `common.training.launch` passing one on, does that)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if not _in_main_thread():
            return main(*args, **kwargs)
        previous = {signum: signal.signal(signum, _raise_stopped) for signum in STOP_SIGNALS}
        stopped = False
        try:
            with children_leave_stop_signals():
                return main(*args, **kwargs)
        except StoppedBySignal as stop:
            stopped = True
            message = (
                f"stopped by {stop} before or after training: the newest complete checkpoint, or the saved final model, "
                f"is what stays; run the same command with --resume_from_checkpoint latest to go on (exit code "
                f"{PREEMPTED_EXIT_CODE})"
            )
            _record_for_launcher(message)
            print(f"{rank_prefix()}{message}", file=sys.stderr, flush=True)
            raise SystemExit(PREEMPTED_EXIT_CODE) from None
        finally:
            if not stopped:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    return wrapper


def _record_for_launcher(message: str) -> None:
    record = os.environ.get(RECORD_ENV)
    if record and os.environ.get("LOCAL_RANK", "0") == "0":
        Path(record).write_text(message + "\n", encoding="utf-8")


__all__ = [
    "PREEMPTED_EXIT_CODE",
    "StopOnSignal",
    "StoppedBySignal",
    "announce_stop",
    "children_leave_stop_signals",
    "stop_signals_end_the_run",
    "RECORD_ENV",
    "STOP_SIGNALS",
]
