"""Run folders (--output_dir): which run wrote them, which checkpoints are whole, and what resume may take.

A run folder belongs to one run. ``run.json`` records the run's id and its identity: the model, the training
mode, a fingerprint of the training data and the arguments that change the trained weights (`RESULT_ARGUMENTS`).
Every checkpoint this project writes holds ``checkpoint_writing.json`` while it is being written and, once
every rank has written its part, ``checkpoint_complete.json``: the run id, the identity and a SHA-256 of every
file in the checkpoint (its manifest).

- One run at a time: ``run.lock`` (host, pid, run id) is created atomically at start and removed at exit; a live
  holder is refused by name, a dead one of this host taken over (`RunFolder.lock`).
- A new run (no --resume_from_checkpoint) into a folder that holds checkpoints or a final model stops at start,
  before anything is loaded. With --overwrite_output_dir, the previous run's outputs are moved into
  ``OUTPUT_DIR/previous-run-ID/`` first; nothing is deleted, and files that no run writes stay where they are.
- Resume refuses a folder whose run had other settings, a checkpoint of another run, and a checkpoint whose
  files no longer match its manifest (parts mixed from different checkpoints or runs, or damaged). Training
  longer (a larger --max_steps or --num_train_epochs alone) extends the run, and run.json records it.
- A checkpoint without our marker (the stock Trainer's, or this project's before markers existed) is resumed
  if its files are whole; a partial one is moved to ``OUTPUT_DIR/incomplete-checkpoint-N``. Only this run's
  own interrupted writes are removed.
- Rotation (--save_total_limit) keeps at most that many of this run's checkpoints, the best among them, and
  only deletes this run's checkpoints.
- Before a resume, every torch file of the checkpoint must load weights-only (`common.model.checkpoint_files`), and
  the resume's own loads are weights-only: a checkpoint file crafted to run code is refused, never unpickled.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from ..data.dataset import data_fingerprint
from ..data.scan_cache import CACHE_FOLDER as SCAN_CACHE_FOLDER
from ..dtypes import SAVE_DTYPES, dtype_name
from ..errors import error_reason
from ..io import follow_umask_in, plain, read_json, whole_file, write_json_atomically
from ..model.checkpoint_files import UnsafeCheckpointFile, check_torch_file, torch_files
from ..model.official_files import base_checkpoint
from ..model.official_format import complete_model_folder, finalize_weights, load_merged, write_final_model
from ..ranks import any_rank, barrier, from_main, gathered, is_main_process, rank_and_world

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
COMPLETE_MARKER = "checkpoint_complete.json"
WRITING_MARKER = "checkpoint_writing.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
INCOMPLETE_PREFIX = "incomplete-"
PREVIOUS_RUN_PREFIX = "previous-run-"
LOCK_NAME = "run.lock"
# The final save is written here first and moved into place once complete.
FINAL_STAGING = "final-model.partial"
# How long a reader waits for a lock file that another start has created but not yet filled in.
LOCK_WRITE_WAIT_S = 2.0

# The arguments that change the trained weights. Left out on purpose: where outputs go, logging, how often
# checkpoints are written, evaluation-only flags, and how the same work is laid out on the hardware (GPU count
# and examples per GPU for one global batch, attention kernels, activation checkpointing, DeepSpeed, packing,
# Liger kernels), which change speed and memory, not what is learned.
RESULT_ARGUMENTS = (
    "batch_size", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
    "warmup_steps", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "label_smoothing_factor", "neftune_noise_alpha", "average_tokens_across_devices", "bf16",
    "fp16", "seed", "data_seed", "train_sampling_strategy", "dataloader_drop_last", "num_crops", "max_length",
    "skip_bad_examples",
)
LORA_ARGUMENTS = ("lora_rank", "lora_alpha_ratio", "lora_dropout")
# Per-part learning rates (common/training/optimizer.py) count only when given, so runs without them keep their identity.
PART_RATE_ARGUMENTS = ("vision_learning_rate", "projection_learning_rate")

# What runs write at the top of an output folder: checkpoints, the final model or adapter with its processor
# files, staged saves, the validation pass's findings, results, curves and logs. --overwrite_output_dir moves
# these; everything else stays. The base's .py code files that a final model carries also stay: the new run's
# final save writes the same names.
RUN_OUTPUT_PATTERNS = (
    "checkpoint-*", f"{INCOMPLETE_PREFIX}checkpoint-*", "merged", "*.partial", SCAN_CACHE_FOLDER, RUN_RECORD,
    "*.safetensors", "*.safetensors.index.json",
    "*.bin", "config.json", "generation_config.json", "adapter_config.json", "preprocessor_config.json",
    "processor_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
    "trainer_state.json", "*_results.json", "eval_*.json", "training_curves.png", "skipped_examples.jsonl",
)
FINAL_WEIGHT_PATTERNS = ("model*.safetensors", "adapter_model.safetensors", "pytorch_model*.bin", "adapter_model.bin")


class RunFolderError(Exception):
    """A run folder that cannot be used as asked; the message says what is there and what to do."""


class CheckpointWriteError(Exception):
    """A checkpoint could not be written; the message names the folder, the free space and what survives."""


# What a failed checkpoint write raises: OSError (ENOSPC, EIO, permissions), RuntimeError from torch.save
# ("PytorchStreamWriter failed writing file"), SafetensorError from safetensors.
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


@dataclass(frozen=True)
class Claim:
    """This process's run in its output folder: the run id, its identity and the checkpoint to resume (or None)."""

    run_id: str
    identity: dict
    checkpoint: str | None
    # What a resume that trains longer changed ("max_steps 4 -> 6"), or None.
    extension: str | None = None

    @property
    def identity_hash(self) -> str:
        return identity_hash(self.identity)


# --------------------------------------------------------------------------------------------------------------
# Identity


def model_identity(name: str) -> str:
    """The model as given on the command line; a local folder adds a hash of its config.json."""
    config = Path(name) / "config.json"
    if config.is_file():
        return f"{name} (config.json {hashlib.sha256(config.read_bytes()).hexdigest()[:12]})"
    return name


def run_identity(args, dataset) -> dict:
    names = RESULT_ARGUMENTS + (LORA_ARGUMENTS if args.use_lora else ())
    identity = {"model": model_identity(args.model_name_or_path), "training_mode": args.training_mode, "data": data_fingerprint(dataset)}
    identity.update({name: plain(getattr(args, name)) for name in names})
    identity.update({name: getattr(args, name) for name in PART_RATE_ARGUMENTS if getattr(args, name, None) is not None})
    return identity


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict, new: dict, limit: int = 4) -> str:
    changed = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more


# --------------------------------------------------------------------------------------------------------------
# Files


def step_of(checkpoint: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(checkpoint.name).group(1))


def checkpoint_folders(folder: Path) -> list[Path]:
    """The checkpoint-N folders in `folder`, oldest step first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()), key=step_of)


def final_weights(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in FINAL_WEIGHT_PATTERNS))


def part_files(checkpoint: Path) -> list[str]:
    """Every file of a checkpoint (relative, with /), our markers excepted: what its manifest covers."""
    markers = (COMPLETE_MARKER, WRITING_MARKER)
    # A marker's temporary (`write_json_atomically`) is left behind only by a crash during its write.
    temporaries = tuple(f".{marker}." for marker in markers)
    return sorted(
        p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
        if p.is_file() and p.name not in markers and not (p.name.startswith(temporaries) and p.name.endswith(".tmp"))
    )


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def hash_parts(checkpoint: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each named file, the files shared out over the ranks (each hashes every world-th one), so
    the time a checkpoint costs to hash shrinks with the number of processes. Collective: every rank calls it,
    and every rank raises when any of them could not read its file (a hash left out would never be checked)."""
    rank, world = rank_and_world()
    mine, unreadable = {}, None
    for name in names[rank::world]:
        try:
            mine[name] = file_sha256(checkpoint / name)
        except OSError as error:
            unreadable = f"{checkpoint / name} ({error_reason(error)})"
            break
    merged: dict[str, str] = {}
    problems = []
    for part, problem in gathered((mine, unreadable)):
        merged.update(part)
        problems += [problem] if problem else []
    if problems:
        raise RunFolderError(f"could not read {problems[0]} to hash it; check the file system and the file's permissions, then run again")
    return {name: merged[name] for name in names}


def missing_parts(checkpoint: Path, world_size: int, deepspeed: bool) -> list[str]:
    """What an exact resume needs from `checkpoint` and does not find whole (empty: the checkpoint is complete):
    weights, optimizer, scheduler, trainer state and one RNG state per rank (rng_state_R.pth with several
    processes, rng_state.pth with one); with DeepSpeed the global_stepN folder its `latest` file names, with the
    model states and every rank's optimizer shard, instead of top-level weights and optimizer.pt."""
    missing = []
    if deepspeed:
        tag_file = checkpoint / "latest"
        tag = tag_file.read_text().strip() if tag_file.is_file() else ""
        states = checkpoint / tag if tag else None
        if states is None or not states.is_dir():
            missing.append("latest" if not tag else tag + "/")
        else:
            if not any(whole_file(p) for p in states.glob("*model_states.pt")):
                missing.append(f"{tag}/*model_states.pt")
            for rank in range(world_size):
                if not any(whole_file(p) for p in states.glob(f"*zero_pp_rank_{rank}_mp_rank_*optim_states.pt")):
                    missing.append(f"{tag}/*zero_pp_rank_{rank}_*optim_states.pt")
    else:
        index = checkpoint / "model.safetensors.index.json"
        shards = sorted(set((read_json(index) or {}).get("weight_map", {}).values())) if index.is_file() else []
        single = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
        if shards:
            missing += [shard for shard in shards if not whole_file(checkpoint / shard)]
        elif not any(whole_file(checkpoint / name) for name in single):
            missing.append("model weights")
        if not whole_file(checkpoint / "optimizer.pt"):
            missing.append("optimizer.pt")
    if not whole_file(checkpoint / "scheduler.pt"):
        missing.append("scheduler.pt")
    if not (checkpoint / "trainer_state.json").is_file():
        missing.append("trainer_state.json")
    rng_files = [f"rng_state_{rank}.pth" for rank in range(world_size)] if world_size > 1 else ["rng_state.pth"]
    missing += [name for name in rng_files if not whole_file(checkpoint / name)]
    return missing


def checkpoint_problems(checkpoint: Path, world_size: int, deepspeed: bool) -> str:
    """Why `checkpoint` cannot be resumed, in words ("" when it can): the parts `missing_parts` finds missing or
    cut short, and a trainer_state.json that is there but unreadable or of another step."""
    missing = missing_parts(checkpoint, world_size, deepspeed)
    problems = ["no " + ", ".join(missing)] if missing else []
    if (checkpoint / "trainer_state.json").is_file():
        state = read_json(checkpoint / "trainer_state.json")
        if state is None:
            problems.append("its trainer_state.json is cut short or not JSON")
        elif state.get("global_step") != step_of(checkpoint):
            problems.append(f"its trainer_state.json is of step {state.get('global_step')}, not {step_of(checkpoint)} "
                            "(a renamed checkpoint, or one copied from elsewhere)")
    return "; ".join(problems)


def free_bytes(folder: Path) -> int | None:
    """Free space on the filesystem that holds `folder` (or its nearest existing parent); None if unknown."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def check_free_space(folder: Path, checkpoint: int, final: int, skip: bool) -> None:
    """Before training: the filesystem of `folder` must have room for one checkpoint (`checkpoint` bytes) plus
    the final model (`final` bytes, what its save needs at most), unless `skip`. Decided on the main process."""

    def decide():
        free = free_bytes(folder)
        shown = human_size(free) if free is not None else "an unknown amount"
        logger.info("a checkpoint of this run takes about %s, its final save about %s; %s free on the filesystem of %s",
                    human_size(checkpoint), human_size(final), shown, folder)
        if skip or free is None or free >= checkpoint + final:
            return
        raise RunFolderError(
            f"{folder} has {human_size(free)} free, but this run needs about {human_size(checkpoint + final)}: one checkpoint "
            f"({human_size(checkpoint)}) plus the final model ({human_size(final)}); make room, choose an --output_dir on "
            "another filesystem, or pass --skip_disk_check to try anyway"
        )

    _decided_on_main(decide)


def human_size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def unused_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... if it is taken."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def move_aside(checkpoint: Path, why: str) -> Path:
    target = unused_name(checkpoint.with_name(INCOMPLETE_PREFIX + checkpoint.name))
    checkpoint.rename(target)
    logger.warning("%s is incomplete (%s): moved it to %s; delete it once you no longer need it", checkpoint, why, target)
    return target


# --------------------------------------------------------------------------------------------------------------
# One run per folder: the lock


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), so that a reused pid is not taken for
    the process that held a lock; None where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _running(pid: int, started: str | None) -> bool:
    """Whether `pid` on this host is still the process that started at `started`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or _process_start(pid) in (None, started)


def _read_lock(lock: Path) -> tuple[dict | None, bytes | None]:
    """(the holder it names, the file's bytes); (None, None) when the file is gone. A file that names no holder
    is read again for up to LOCK_WRITE_WAIT_S: another start may have created it and not yet written it."""
    deadline = time.monotonic() + LOCK_WRITE_WAIT_S
    while True:
        try:
            raw = lock.read_bytes()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = None
        if isinstance(holder, dict) and "pid" in holder or time.monotonic() > deadline:
            return holder if isinstance(holder, dict) else None, raw
        time.sleep(0.1)


def _describe_holder(holder: dict) -> str:
    return f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})"


def _refusal(folder: Path, lock: Path, holder: dict | None) -> str:
    if holder is None:
        return (f"{folder} is locked by {lock}, which names no run (a start that died while writing it, or damaged): "
                "if no run is using that folder, delete the file and start again, or choose another --output_dir")
    if holder.get("host") != socket.gethostname():
        return (f"{folder} is in use by {_describe_holder(holder)}; if that run is really gone, delete {lock} and "
                "start again, or choose another --output_dir")
    return f"{folder} is in use by {_describe_holder(holder)}: wait for it to end, or choose another --output_dir"


def _stale(holder: dict | None) -> bool:
    """A lock of a process of this host that is no longer running, or of an earlier run in this very process
    (scripts' main() called in turn, as the tests do)."""
    if holder is None or holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return holder.get("started_at") == _process_start(os.getpid())
    return not _running(holder["pid"], holder.get("started_at"))


def _set_aside(lock: Path, stale: bytes) -> bool:
    """Remove the stale lock whose bytes are `stale`; False when another start got there first. The lock is
    renamed away before it is checked, so that two starts taking it over cannot both remove it: one of them
    finds the other's fresh lock in its hands and puts it back."""
    aside = lock.with_name(f"{lock.name}.{uuid.uuid4().hex[:8]}.stale")
    try:
        lock.rename(aside)
    except FileNotFoundError:
        return False
    if aside.read_bytes() == stale:
        aside.unlink()
        return True
    try:
        os.link(aside, lock)
    except FileExistsError:
        pass
    aside.unlink()
    return False


_held_locks: dict[Path, bytes] = {}


def release_held_locks() -> None:
    """Give back every output folder this process holds: it exits, or its run stopped with an error."""
    for lock, mine in list(_held_locks.items()):
        release_lock(lock, mine)


atexit.register(release_held_locks)


def release_lock(lock: Path, mine: bytes) -> None:
    """Remove `lock` if it still holds this process's claim `mine`."""
    _held_locks.pop(lock, None)
    try:
        if lock.read_bytes() == mine:
            lock.unlink()
    except OSError:
        pass


def take_lock(folder: Path, run_id: str) -> bytes:
    """Create ``folder/run.lock`` for `run_id` atomically (O_CREAT|O_EXCL); a lock of a process of this host that
    has died is taken over with a warning, any other lock refused naming its holder. Returns the lock's bytes;
    it is removed when this process exits."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    mine = json.dumps({
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": _process_start(os.getpid()),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }).encode()
    for _ in range(3):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, raw = _read_lock(lock)
            if raw is None:
                continue
            if not _stale(holder):
                raise RunFolderError(_refusal(folder, lock, holder))
            if _set_aside(lock, raw) and holder["pid"] != os.getpid():
                logger.warning("%s was claimed by %s, which is no longer running: taking it over", folder, _describe_holder(holder))
            continue
        with os.fdopen(handle, "wb") as file:
            file.write(mine)
            file.flush()
            os.fsync(file.fileno())
        _held_locks[lock] = mine
        return mine
    holder, _ = _read_lock(lock)
    raise RunFolderError(_refusal(folder, lock, holder))


def check_not_base_folder(args) -> None:
    """--output_dir must not be, lie inside or contain the local folder of the model training starts from: the
    run's saves (and --overwrite_output_dir's moves) would change that model."""
    base = Path(args.model_name_or_path)
    if not base.is_dir():
        return
    base, out = base.resolve(), Path(args.output_dir).resolve()
    relation = "is" if out == base else "is inside" if base in out.parents else "contains" if out in base.parents else None
    if relation:
        raise RunFolderError(
            f"--output_dir {args.output_dir} {relation} the base model folder --model_name_or_path {args.model_name_or_path}: "
            "the run would write over the model it starts from; choose an --output_dir outside it"
        )


def resumes(args) -> bool:
    return args.resume_from_checkpoint not in (None, "", "false", "False")


def _decided_on_main(decide):
    """Run `decide` on the main process only (it may move or remove files) and give every rank its result, or
    its error, so that all ranks go on or stop together with the same message."""
    result = error = None
    if is_main_process():
        try:
            result = decide()
        except RunFolderError as failure:
            error = str(failure)
        except OSError as failure:
            error = f"could not set up the run folder: {failure}"
    result, error = from_main((result, error))
    if error:
        raise RunFolderError(error)
    return result


def describe_outputs(folder: Path) -> str:
    checkpoints = [p.name for p in checkpoint_folders(folder)]
    parts = []
    if checkpoints:
        parts.append(", ".join(checkpoints if len(checkpoints) <= 4 else [checkpoints[0], "...", checkpoints[-1]]))
    if final_weights(folder):
        parts.append("a final model")
    return " and ".join(parts)


class RunFolder:
    """--output_dir as one run's: built once in a script's main() from the parsed arguments, each step a call of
    its own, in this order: `lock`, `move_previous_run_aside`, `claim` (the run's identity and the checkpoint to
    resume), `clear_interrupted_checkpoints`; then, during training, `save_checkpoint` (manifests and rotation)
    and, at the end, `release`. Every rank makes the same calls; files are changed by the main process only."""

    def __init__(self, args):
        self.args = args
        self.folder = Path(args.output_dir)
        # Read once: the Trainer's own rotation is turned off (`RecipeTrainer`), this folder rotates instead.
        self.save_total_limit = getattr(args, "save_total_limit", None)
        self.run_id: str | None = None
        self.claim_made: Claim | None = None
        # Main process: what `claim` found newer than the checkpoint it chose, for `clear_interrupted_checkpoints`.
        self._interrupted: list[tuple[str, str | None]] = []

    @property
    def resumes(self) -> bool:
        return resumes(self.args)

    def lock(self) -> str:
        """Claim --output_dir for one run before anything is read: the main process takes the lock (`take_lock`),
        every rank gets the run id it holds (the resumed run's, from run.json, or a new one)."""
        if self.run_id is not None:
            return self.run_id
        check_not_base_folder(self.args)

        def decide():
            record = read_json(self.folder / RUN_RECORD) if self.resumes else None
            run_id = (record or {}).get("run_id") or uuid.uuid4().hex[:12]
            take_lock(self.folder, run_id)
            return run_id

        self.run_id = _decided_on_main(decide)
        return self.run_id

    def release(self) -> None:
        """The run is over (or stops): give its --output_dir's lock back."""
        lock = self.folder / LOCK_NAME
        if self.run_id is not None and is_main_process() and lock in _held_locks:
            release_lock(lock, _held_locks[lock])

    def move_previous_run_aside(self) -> None:
        """Before anything is loaded: a new run into a folder holding another run's checkpoints or final model
        stops, or, with --overwrite_output_dir, moves them into OUTPUT_DIR/previous-run-ID/ (nothing is deleted)."""
        folder, args = self.folder, self.args
        if resumes(args):
            if args.overwrite_output_dir:
                raise RunFolderError(
                    "--overwrite_output_dir and --resume_from_checkpoint exclude each other: give --resume_from_checkpoint "
                    f"to continue the run in {folder}, or --overwrite_output_dir to start a new one there"
                )
            return

        def decide():
            held = describe_outputs(folder)
            if not held:
                return
            record = read_json(folder / RUN_RECORD)
            owner = f"run {record['run_id']}" if record and "run_id" in record else "an earlier run"
            if not args.overwrite_output_dir:
                raise RunFolderError(
                    f"{folder} already holds {held} of {owner}; to continue that run add --resume_from_checkpoint latest, "
                    "to start a new run there anyway add --overwrite_output_dir (moves its outputs into "
                    f"{folder}/{PREVIOUS_RUN_PREFIX}..., nothing is deleted), or choose another --output_dir"
                )
            stamp = record["run_id"] if record and "run_id" in record else datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            target = unused_name(folder / f"{PREVIOUS_RUN_PREFIX}{stamp}")
            target.mkdir()
            for entry in sorted(folder.iterdir()):
                if entry != target and any(fnmatch.fnmatch(entry.name, pattern) for pattern in RUN_OUTPUT_PATTERNS):
                    entry.rename(target / entry.name)
            logger.warning("--overwrite_output_dir: moved %s of %s (%s) into %s; delete it once you no longer need it",
                           held, owner, human_size(folder_size(target)), target)

        _decided_on_main(decide)

    def claim(self, dataset) -> Claim:
        """Make the locked folder this run's: record a new run in run.json, or find the checkpoint to resume and
        verify that it belongs to this run and is whole. Every rank calls it, before the model is loaded; it
        changes no checkpoint (`clear_interrupted_checkpoints` does). Later calls return the first answer."""
        if self.claim_made is not None:
            return self.claim_made
        if self.run_id is None:
            raise RuntimeError("RunFolder.claim: lock the folder first (RunFolder.lock)")
        identity = run_identity(self.args, dataset)
        if self.resumes:
            claim = self._claim_for_resume(identity)
        else:
            claim = Claim(self.run_id, identity, None)
            if is_main_process():
                self.folder.mkdir(parents=True, exist_ok=True)
                _write_record(self.folder, claim, self.args)
        barrier()
        self.claim_made = claim
        return claim

    def _claim_for_resume(self, identity: dict) -> Claim:
        args, folder = self.args, self.folder
        world_size = rank_and_world()[1]
        deepspeed = bool(args.deepspeed)
        digest = identity_hash(identity)
        requested = str(args.resume_from_checkpoint)

        def decide():
            record = read_json(folder / RUN_RECORD)
            extension = None
            if record and record.get("identity_hash") != digest:
                extension = extension_of(record.get("identity", {}), identity)
                if extension is None:
                    raise RunFolderError(
                        f"{folder} holds run {record.get('run_id')}, trained with other settings "
                        f"({differences(record.get('identity', {}), identity)}); resume it with the settings it started with "
                        "(a larger --max_steps or --num_train_epochs alone extends it), or start a new run with "
                        "--overwrite_output_dir instead of --resume_from_checkpoint, or another --output_dir"
                    )
            run_id = record.get("run_id") if record else None
            if requested.lower() in ("latest", "true"):
                found, self._interrupted = _newest_resumable(folder, run_id, digest, identity, world_size, deepspeed)
            else:
                found = _named_checkpoint(Path(requested), run_id, digest, identity, world_size, deepspeed)
            return (*found, extension)

        checkpoint, manifest, run_id, extension = _decided_on_main(decide)
        if manifest is not None:
            _verify_manifest(Path(checkpoint), manifest)
        if checkpoint is not None:
            _check_format(Path(checkpoint), deepspeed)
            _check_torch_files(Path(checkpoint))
        claim = Claim(run_id or self.run_id, identity, checkpoint, extension)
        if extension and is_main_process():
            _record_extension(folder, read_json(folder / RUN_RECORD), identity, extension, checkpoint)
        if is_main_process() and not (folder / RUN_RECORD).is_file():
            # A folder from the stock Trainer or an older version of this project: from now on it is this run's.
            folder.mkdir(parents=True, exist_ok=True)
            _write_record(folder, claim, args)
        if checkpoint is None:
            logger.warning("--resume_from_checkpoint %s: no checkpoint to resume in %s, training from the start", requested, folder)
        else:
            logger.info("resuming from %s", checkpoint)
        return claim

    def clear_interrupted_checkpoints(self) -> None:
        """After `claim` with --resume_from_checkpoint latest: of the checkpoints newer than the one it chose, this
        run's own interrupted writes are removed, other incomplete ones moved to OUTPUT_DIR/incomplete-checkpoint-N."""

        def decide():
            for checkpoint, problems in self._interrupted:
                if problems is None:
                    logger.warning("removing %s: this run's write of it never completed (it was stopped while saving)", checkpoint)
                    shutil.rmtree(checkpoint)
                else:
                    move_aside(Path(checkpoint), problems)
            self._interrupted = []

        _decided_on_main(decide)

    def save_checkpoint(self, write, step: int, best: str | None, tokenizer) -> Path:
        """Write checkpoint-`step` with `write` (every rank), marked as this run's while it is written and complete,
        in the official checkpoint's format (`complete_saved_model`), with its manifest, once every rank has written
        its part; then rotation (--save_total_limit) deletes only this run's older checkpoints. A write that fails
        on any rank ends the run on every rank with one line."""
        claim = self.claim_made
        checkpoint = self.folder / f"checkpoint-{step}"
        main = is_main_process()
        self.attempt(checkpoint, begin_checkpoint, checkpoint, claim, step, main_only=True)
        self.attempt(checkpoint, write)
        self.attempt(checkpoint, self.complete_saved_model, checkpoint, tokenizer, main_only=True)
        hashes = hash_parts(checkpoint, from_main(part_files(checkpoint) if main else None))
        self.attempt(checkpoint, finish_checkpoint, checkpoint, claim, step, hashes, main_only=True)
        if main:
            # After the manifest: deleting the previous checkpoint before the new one is complete could leave
            # nothing to resume from.
            rotate(self.folder, claim.run_id, self.save_total_limit, best)
        barrier()
        return checkpoint

    def complete_saved_model(self, folder: Path, tokenizer) -> None:
        """Main process: a folder the Trainer saved a whole model into (config.json, not an adapter) gets what the
        official checkpoint holds around the weights (`complete_model_folder`); its files follow the umask."""
        if (folder / "config.json").is_file():
            complete_model_folder(folder, self.args.model_name_or_path, tokenizer)
        else:
            follow_umask_in(folder)

    def keep_only_best(self, best: str | None) -> None:
        """At the end of training under --save_total_limit 1 with a best checkpoint: only the best of this run's
        checkpoints stays, as the Trainer's own end-of-training cleanup leaves it."""
        if self.save_total_limit == 1 and best is not None and is_main_process():
            rotate(self.folder, self.claim_made.run_id, 1, best, newest_too=False)
        barrier()

    def save_final(self, trainer, processor) -> Path:
        """The final model or LoRA adapter, plus the processor, in --output_dir, in the official checkpoint's
        format (`common.outputs.export`); a full model in the base's dtype unless --save_dtype says otherwise; with
        --merge_lora also the merged model in OUTPUT_DIR/merged.

        It is written by `trainer` into OUTPUT_DIR/final-model.partial and its files moved to their final names
        (weights last) once all of it is written, so a save that fails (a full disk) leaves no half-written model
        under those names: the run ends with one line saying so and which checkpoint survives."""
        staging = self.folder / FINAL_STAGING
        if is_main_process():
            # Left by an earlier final save that was killed.
            shutil.rmtree(staging, ignore_errors=True)
        barrier()
        self.attempt(staging, trainer.save_model, str(staging), describe=failed_final_save_message)
        self.attempt(staging, self.complete_saved_model, staging, processor.tokenizer, main_only=True, describe=failed_final_save_message)
        self.attempt(staging, self._move_final_into_place, staging, main_only=True, describe=failed_final_save_message)
        trainer.save_state()
        barrier()
        if self.args.merge_lora:
            self._merge_lora_adapter(self.folder / "merged", processor)
        return self.folder

    def _move_final_into_place(self, staging: Path) -> None:
        """Main process: a full model's weights cast to the saved dtype, then every file of the staged final save
        moved to its name in --output_dir, the weights last."""
        args = self.args
        if args.training_mode in ("full", "frozen_vision"):
            dtype = finalize_weights(staging, args.model_name_or_path, SAVE_DTYPES.get(args.save_dtype))
            logger.info("final model written to %s with %s weights", staging.parent, dtype_name(dtype))
        weights = set(final_weights(staging))
        for entry in sorted(staging.iterdir(), key=lambda path: path.name in weights):
            entry.replace(staging.parent / entry.name)
        staging.rmdir()

    def _merge_lora_adapter(self, merged_dir: Path, processor) -> None:
        """Merge the saved adapter into the base loaded afresh in fp32 (adapters cannot be folded into 4-bit
        weights exactly), then write it as a final model in the base's dtype or --save_dtype: into
        OUTPUT_DIR/merged.partial, renamed to `merged_dir` once whole, so a merge that fails (a full disk) leaves
        no half-written model under that name."""
        staging = merged_dir.with_name(merged_dir.name + ".partial")
        if is_main_process():
            # Left by an earlier merge that was killed.
            shutil.rmtree(staging, ignore_errors=True)
        self.attempt(staging, self._write_merged, staging, merged_dir, processor, main_only=True, describe=failed_merge_message)
        barrier()

    def _write_merged(self, staging: Path, merged_dir: Path, processor) -> None:
        args = self.args
        merged = load_merged(self.folder, args.model_name_or_path)
        dtype = write_final_model(merged, processor, staging, args.model_name_or_path, SAVE_DTYPES.get(args.save_dtype))
        del merged
        # An earlier merge of this run (a resumed run writes its final outputs again).
        shutil.rmtree(merged_dir, ignore_errors=True)
        staging.replace(merged_dir)
        logger.info("merged LoRA model written to %s with %s weights", merged_dir, dtype_name(dtype))

    @staticmethod
    def attempt(folder: Path, action, *args, main_only: bool = False, describe=None) -> None:
        """One part of a checkpoint write (or of the final save, into its staging folder), then a vote: if it
        failed on any rank, every rank stops here together (no rank is left waiting in a collective), the partial
        folder is removed, and the failing ones say why in one line (`describe`, default `failed_write_message`)."""
        failure = None
        try:
            if is_main_process() or not main_only:
                action(*args)
        except SAVE_ERRORS as error:
            failure = error
        if not any_rank(failure is not None):
            return
        # Measured before our partial write is removed: the space the write ran out of.
        free = free_bytes(folder.parent)
        if is_main_process():
            shutil.rmtree(folder, ignore_errors=True)
        barrier()
        if failure is None:
            # Another rank's write failed; its line says why.
            raise SystemExit(1)
        raise CheckpointWriteError((describe or failed_write_message)(folder, failure, free)) from failure


def _write_record(folder: Path, claim: Claim, args) -> None:
    # The commit a hub base was read at (the hub's `main` moves on); None for a local folder.
    base = {"model_name_or_path": args.model_name_or_path, "revision": base_checkpoint(args.model_name_or_path).revision}
    write_json_atomically(folder / RUN_RECORD, {
        "run_id": claim.run_id,
        "identity_hash": claim.identity_hash,
        "identity": claim.identity,
        "base": base,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    })


# What a run may change when it resumes: training longer. Everything else that changes the weights stays fixed.
LENGTH_ARGUMENTS = ("max_steps", "num_train_epochs")


def extension_of(old: dict, new: dict) -> str | None:
    """"max_steps 4 -> 6" when `new` differs from `old` only in training longer: a larger --max_steps (both
    runs counted in steps), or a larger --num_train_epochs (both counted in epochs, --max_steps unset);
    None for any other difference."""
    if {key for key in set(old) | set(new) if old.get(key) != new.get(key)} - set(LENGTH_ARGUMENTS):
        return None
    steps, epochs = (old.get("max_steps"), new.get("max_steps")), (old.get("num_train_epochs"), new.get("num_train_epochs"))
    if not all(isinstance(value, (int, float)) for value in (*steps, *epochs)):
        return None
    if steps[0] > 0 and steps[1] > steps[0] and epochs[0] == epochs[1]:
        return f"max_steps {steps[0]} -> {steps[1]}"
    if steps[0] <= 0 and steps[1] == steps[0] and epochs[1] > epochs[0]:
        return f"num_train_epochs {epochs[0]} -> {epochs[1]}"
    return None


def _record_extension(folder: Path, record: dict, identity: dict, extension: str, checkpoint: str | None) -> None:
    """Main process: run.json takes the longer run's identity and lists the extension."""
    old = record.get("identity", {})
    entry = {
        "changed": {key: [old.get(key), identity.get(key)] for key in LENGTH_ARGUMENTS if old.get(key) != identity.get(key)},
        "from_checkpoint": Path(checkpoint).name if checkpoint else None,
        "at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    updated = {**record, "identity_hash": identity_hash(identity), "identity": identity,
               "extensions": [*record.get("extensions", []), entry]}
    write_json_atomically(folder / RUN_RECORD, updated)
    logger.warning("extending run %s (%s): it continues from %s", record.get("run_id"), extension,
                   Path(checkpoint).name if checkpoint else "the start")


def _owned(marker: dict, run_id: str | None, digest: str, identity: dict, checkpoint: Path) -> None:
    """Refuse a manifest checkpoint of another run, or of a run with other settings."""
    if run_id and marker.get("run_id") != run_id:
        raise RunFolderError(
            f"{checkpoint} belongs to run {marker.get('run_id')} (its {COMPLETE_MARKER}), not to run {run_id} that "
            f"{checkpoint.parent / RUN_RECORD} records; move it out of that folder, or resume another checkpoint "
            "with --resume_from_checkpoint PATH"
        )
    if marker.get("identity_hash") != digest and extension_of(marker.get("identity", {}), identity) is None:
        raise RunFolderError(
            f"{checkpoint} was written by a run with other settings ({differences(marker.get('identity', {}), identity)}); "
            "resume it with the settings it was trained with, or start a new run in another --output_dir"
        )


def _newest_resumable(folder: Path, run_id, digest, identity, world_size, deepspeed):
    """((checkpoint, its manifest or None, run id), interrupted) for `latest`: the newest checkpoint that is ours
    and whole, or whole by its files; `interrupted` lists the newer ones passed over, each (path, None) for this
    run's own interrupted write or (path, what is missing) for another incomplete one."""
    interrupted = []
    for checkpoint in reversed(checkpoint_folders(folder)):
        marker = read_json(checkpoint / COMPLETE_MARKER)
        writing = read_json(checkpoint / WRITING_MARKER)
        if marker and "files" in marker:
            _owned(marker, run_id, digest, identity, checkpoint)
            return (str(checkpoint), marker["files"], marker["run_id"]), interrupted
        if writing and run_id and writing.get("run_id") == run_id and not marker:
            interrupted.append((str(checkpoint), None))
            continue
        problems = checkpoint_problems(checkpoint, world_size, deepspeed)
        if problems:
            interrupted.append((str(checkpoint), problems))
            continue
        logger.warning("%s has no manifest (written by the stock Trainer or an older version of this project): its files "
                       "are whole, but nothing shows that it was trained with these settings", checkpoint)
        return (str(checkpoint), None, run_id), interrupted
    return (None, None, run_id), interrupted


def _named_checkpoint(checkpoint: Path, run_id, digest, identity, world_size, deepspeed):
    if not checkpoint.is_dir() or not CHECKPOINT_NAME.fullmatch(checkpoint.name):
        raise RunFolderError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint-N folder; pass one, or `latest`")
    marker = read_json(checkpoint / COMPLETE_MARKER)
    if marker and "files" in marker:
        _owned(marker, run_id, digest, identity, checkpoint)
        return str(checkpoint), marker["files"], marker["run_id"]
    problems = checkpoint_problems(checkpoint, world_size, deepspeed)
    if problems:
        raise RunFolderError(
            f"--resume_from_checkpoint {checkpoint}: not a complete checkpoint ({problems}); pass a complete "
            "checkpoint-N folder or `latest`"
        )
    return str(checkpoint), None, run_id


def _verify_manifest(checkpoint: Path, manifest: dict) -> None:
    """Every rank: the checkpoint's files must be exactly those its manifest lists, with the same hashes."""
    names = from_main(part_files(checkpoint))
    hashes = hash_parts(checkpoint, names)
    # A name on one side only is always a change, whatever the other side recorded.
    changed = sorted(name for name in set(names) | set(manifest) if name not in hashes or name not in manifest or hashes[name] != manifest[name])
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise RunFolderError(
            f"{checkpoint} mixes parts: its {COMPLETE_MARKER} recorded other contents for {shown} when it was written "
            "(copied from another checkpoint or run, changed or removed since); resume an intact checkpoint with "
            "--resume_from_checkpoint PATH, or move this one out of the folder"
        )


def _check_torch_files(checkpoint: Path) -> None:
    """Every rank, before anything unpickles: each torch file of the checkpoint (shared out over the ranks)
    holds only what a weights-only load builds, whether or not a manifest vouches for it."""
    rank, world = rank_and_world()
    names = from_main([path.relative_to(checkpoint).as_posix() for path in torch_files(checkpoint)])
    refusal = None
    for name in names[rank::world]:
        try:
            check_torch_file(checkpoint / name)
        except UnsafeCheckpointFile as error:
            refusal = str(error)
            break
    refusals = [message for message in gathered(refusal) if message]
    if refusals:
        raise RunFolderError(refusals[0])


def _check_format(checkpoint: Path, deepspeed: bool) -> None:
    has_deepspeed_states = (checkpoint / "latest").is_file()
    if deepspeed and not has_deepspeed_states:
        raise RunFolderError(f"{checkpoint} was written without DeepSpeed; resume it with --deepspeed none")
    if not deepspeed and has_deepspeed_states:
        raise RunFolderError(f"{checkpoint} was written with DeepSpeed; resume it with the same --deepspeed config")


# --------------------------------------------------------------------------------------------------------------
# Writing checkpoints


def begin_checkpoint(checkpoint: Path, claim: Claim, step: int) -> None:
    """Main process, before any rank writes into `checkpoint`: mark the write as this run's and in progress. A
    folder being written again (resume from an older checkpoint) loses its old complete marker first."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
    write_json_atomically(checkpoint / WRITING_MARKER, {"global_step": step, "run_id": claim.run_id})


def finish_checkpoint(checkpoint: Path, claim: Claim, step: int, hashes: dict) -> None:
    """Main process, after every rank wrote its part: the manifest makes the checkpoint complete."""
    write_json_atomically(checkpoint / COMPLETE_MARKER, {
        "global_step": step,
        "run_id": claim.run_id,
        "identity_hash": claim.identity_hash,
        "identity": claim.identity,
        "files": hashes,
    })
    (checkpoint / WRITING_MARKER).unlink(missing_ok=True)


def newest_complete(folder: Path, run_id: str | None = None) -> Path | None:
    """The newest checkpoint with our complete marker (of `run_id` when given)."""
    for checkpoint in reversed(checkpoint_folders(folder)):
        marker = read_json(checkpoint / COMPLETE_MARKER)
        if marker and (run_id is None or marker.get("run_id") == run_id):
            return checkpoint
    return None


def rotate(folder: Path, run_id: str, limit: int | None, keep: str | None, newest_too: bool = True) -> None:
    """Main process: keep at most `limit` complete checkpoints of this run, as the HF Trainer does: the newest,
    and among them `keep` (the best one, when the Trainer tracks it) in place of the oldest of them. With a limit
    of 1 and a best that is not the newest, both stay (the newest is what a resume needs) unless not
    `newest_too` (training has ended). This run's other checkpoints are deleted; other runs' are never touched."""
    if not limit or limit < 1:
        return
    ours = [p for p in checkpoint_folders(folder) if (read_json(p / COMPLETE_MARKER) or {}).get("run_id") == run_id]
    best = next((p for p in ours if keep and p.resolve() == Path(keep).resolve()), None)
    newest_first = [p for p in reversed(ours) if p != best]
    if best is None:
        kept = newest_first[:limit]
    else:
        kept = [best, *newest_first[:max(limit - 1, 0 if best == ours[-1] or not newest_too else 1)]]
    for checkpoint in ours:
        if checkpoint not in kept:
            logger.info("deleting %s (--save_total_limit %d)", checkpoint, limit)
            shutil.rmtree(checkpoint, ignore_errors=True)


def _full_disk(error: BaseException, free: int | None, needed: int | None) -> bool:
    """torch.save reports a full disk only as "unexpected pos", so a write that failed with less free space than
    it needed (`needed`, when known) is called a full disk too."""
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
        return True
    return free is not None and needed is not None and free < needed


def failed_write_message(checkpoint: Path, error: BaseException, free: int | None) -> str:
    """One line for a checkpoint write that failed with `error` while `free` bytes were free: the folder, the
    space, and what survives (the previous checkpoint's size is what this one needed)."""
    survivor = newest_complete(checkpoint.parent)
    needed = folder_size(survivor) if survivor else None
    reason = "no space left on the device" if _full_disk(error, free, needed) else error_reason(error)
    space = f"{human_size(free)} free on its filesystem" if free is not None else "free space unknown"
    if needed is not None:
        space += f", a checkpoint takes {human_size(needed)}"
    if survivor is None:
        kept = "no complete checkpoint exists yet, so a rerun starts from the beginning"
    else:
        kept = f"{survivor.name} is complete and intact: make room, then rerun with --resume_from_checkpoint latest"
    return f"could not write {checkpoint}: {reason} ({space}); removed this run's partial {checkpoint.name}; {kept}"


def failed_final_save_message(staging: Path, error: BaseException, free: int | None) -> str:
    """One line for a final save into `staging` that failed: nothing of it reached the final names, and what
    survives is the newest complete checkpoint (resuming it at its last step writes the final model)."""
    folder = staging.parent
    survivor = newest_complete(folder)
    reason = "no space left on the device" if _full_disk(error, free, None) or (free is not None and free < 1 << 20) else error_reason(error)
    space = f"{human_size(free)} free on its filesystem" if free is not None else "free space unknown"
    if survivor is None:
        kept = ("no checkpoint of this run exists (with --save_strategy no only the final save keeps the weights), so "
                "the trained weights are lost: make room and train again")
    else:
        kept = (f"{survivor.name} is the newest complete checkpoint and intact: make room, then rerun with "
                "--resume_from_checkpoint latest to write the final model from it")
    return (f"could not write the final model in {folder}: {reason} ({space}); nothing was written under its final "
            f"names (the partial {staging.name} was removed); {kept}")


def failed_merge_message(staging: Path, error: BaseException, free: int | None) -> str:
    """One line for a --merge_lora write into `staging` that failed: the adapter beside it is whole."""
    folder = staging.parent
    merged = staging.name.removesuffix(".partial")
    reason = "no space left on the device" if _full_disk(error, free, None) or (free is not None and free < 1 << 20) else error_reason(error)
    space = f"{human_size(free)} free on its filesystem" if free is not None else "free space unknown"
    return (f"could not write the merged model in {folder / merged}: {reason} ({space}); nothing was written under that "
            f"name (the partial {staging.name} was removed); the adapter in {folder} is whole: make room, then run "
            f"python -m common.export --adapter {folder} --out {folder / merged}")


__all__ = [
    "RunFolderError",
    "CheckpointWriteError",
    "RunFolder",
    "Claim",
    "check_free_space",
    "release_held_locks",
    "resumes",
    "missing_parts",
    "COMPLETE_MARKER",
    "WRITING_MARKER",
    "RUN_RECORD",
]
