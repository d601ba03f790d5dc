"""torchrun for jobs that can be preempted: ``python -m common.launch`` takes exactly torchrun's arguments.

    python -m common.launch --nproc_per_node=8 finetune_hf_trainer_docvqa.py --bf16 ... --resume_from_checkpoint latest

Three differences from plain torchrun, all for `common.training.preemption`:

- its exit code is 75 (`PREEMPTED_EXIT_CODE`) when the workers stopped on SIGTERM/SIGUSR1 after writing a
  complete checkpoint; torchrun exits 1 whatever its workers returned, so a job script cannot tell that from
  a crash;
- it passes SIGUSR1 on to the workers as it does SIGTERM (torchrun dies of SIGUSR1 and leaves its workers
  running), unless --signals_to_handle says otherwise;
- it waits for the workers to finish that checkpoint: torchrun SIGKILLs them 30 s after passing a signal on,
  which can cut a large checkpoint short; here the scheduler's own kill is the limit, unless --shutdown_timeout
  or TORCH_ELASTIC_SHUTDOWN_TIMEOUT is given.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from .preemption import PREEMPTED_EXIT_CODE, RECORD_ENV

TORCHRUN_DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
# A day: longer than any scheduler's grace period, so torchrun never kills a checkpoint write the scheduler allows.
SHUTDOWN_TIMEOUT_S = 24 * 3600


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.signals_to_handle == TORCHRUN_DEFAULT_SIGNALS:
        args.signals_to_handle += ",SIGUSR1"
    if args.shutdown_timeout is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    with tempfile.TemporaryDirectory(prefix="phi3v-launch-") as scratch:
        record = Path(scratch) / "stopped"
        os.environ[RECORD_ENV] = str(record)
        try:
            run(args)
        except (ChildFailedError, SignalException):
            if not record.is_file():
                raise
            print(record.read_text(encoding="utf-8").strip(), file=sys.stderr, flush=True)
            raise SystemExit(PREEMPTED_EXIT_CODE) from None


if __name__ == "__main__":
    main()
