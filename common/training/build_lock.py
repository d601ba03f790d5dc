"""No silent wait on torch's extension build lock.

DeepSpeed compiles its ops (on CPU: ``deepspeed_shm_comm``) under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions/<py>_<accelerator>/``), one folder per op, and
torch serialises the build with the file ``lock`` in that folder. In the torch this project pins, that lock is a
kernel advisory lock (flock) on the file, not the file's existence: the file stays after every build and a
builder that dies, however it is killed, releases the lock, so a leftover file is taken over by the next build
by itself. What still blocks is a live holder: a build in progress (the wait is short), or a process stopped in
the middle of its build (Ctrl-Z, SIGSTOP, a suspended job), for which every later run waits forever, saying
nothing. `check_build_locks` finds each held lock's holder in /proc/locks before DeepSpeed starts: a stopped
holder stops the run naming it, a running one is named in one line and waited for.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


class BuildLockError(ValueError):
    """A build lock no live build will release; the message names the file and the process holding it."""


def extensions_root() -> Path:
    """Where torch builds extensions, as `torch.utils.cpp_extension` computes it (not imported: importing it
    logs a warning about the CUDA runtime on machines without one)."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return Path(configured)
    import torch
    from torch._appdirs import user_cache_dir

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(os.path.realpath(user_cache_dir(appname="torch_extensions"))) / f"{python}_{accelerator}"


def is_held(lock: Path) -> bool:
    """Whether some process holds the flock on `lock` now (probed without waiting, released at once)."""
    try:
        descriptor = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


def lock_holders(lock: Path) -> list[int]:
    """Pids holding a lock on `lock`'s inode, from /proc/locks (empty where it is not visible from this host)."""
    status = lock.stat()
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    holders = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked waiters are listed with "->" and skipped.
        if len(fields) >= 6 and fields[1] != "->" and fields[5] == device and fields[4].isdigit():
            holders.append(int(fields[4]))
    return sorted(set(holders))


def describe_process(pid: int) -> tuple[str, str]:
    """(state letter from /proc/PID/stat, command line) of `pid`; ("", "") once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "", ""
    return stat.rsplit(")", 1)[1].split()[0], command


def check_build_locks(root: Path | None = None) -> None:
    """Before DeepSpeed builds or loads its ops: name every held build lock; refuse one held by a stopped process."""
    root = root or extensions_root()
    if not root.is_dir():
        return
    for lock in sorted(root.glob("*/lock")):
        if not is_held(lock):
            continue
        holders = lock_holders(lock)
        for pid in holders:
            state, command = describe_process(pid)
            if state in ("T", "t"):
                raise BuildLockError(
                    f"{lock} is held by process {pid} ({command[:120]}), which is stopped in the middle of building "
                    f"DeepSpeed's {lock.parent.name} op, so this run would wait for it forever; end it (kill {pid}) or "
                    f"let it go on (kill -CONT {pid}), then start again"
                )
        if holders:
            logger.warning("%s is held by process %s, which is building DeepSpeed's %s op: waiting for it to finish",
                           lock, ", ".join(map(str, holders)), lock.parent.name)
        else:
            logger.warning("%s is held by a process this host cannot see (another host sharing the folder): waiting for "
                           "it; if no build runs anywhere, delete %s", lock, lock)


__all__ = ["BuildLockError", "check_build_locks", "extensions_root"]
