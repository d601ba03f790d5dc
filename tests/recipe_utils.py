"""Running recipe scripts end to end from tests: in one process or under torchrun, always offline."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.training.arguments import LAUNCHER_VARIABLES, set_launcher_environment

REPO_ROOT = Path(__file__).resolve().parents[1]
DRIVER = REPO_ROOT / "tests" / "drivers" / "run_recipe.py"


def offline_env(tmp_path: Path, **extra) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update({key: str(value) for key, value in extra.items()})
    return env


def run_script(script: str, args: list, tmp_path: Path, nproc: int = 1, env: dict | None = None, timeout: int = 600):
    """Run `script` (through the observer driver) with `nproc` processes; return the CompletedProcess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    command = [*launcher, str(DRIVER), script, *map(str, args)]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=offline_env(tmp_path, **(env or {})), capture_output=True, text=True, timeout=timeout
    )


def assert_ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}"


def read_eval(output_dir: Path, name: str) -> dict:
    payload = json.loads((output_dir / f"eval_{name}.json").read_text())
    assert payload["num_examples"] == len(payload["examples"]) > 0
    return payload


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_ranks_in_sync(digest_dir: Path, nproc: int = 2) -> None:
    digests = [json.loads((digest_dir / f"rank{rank}.json").read_text()) for rank in range(nproc)]
    assert digests[0] and all(d == digests[0] for d in digests[1:]), "ranks ended with different weights"


def launched_as_one_process(monkeypatch) -> None:
    """The environment a launcher gives one process (what `set_launcher_environment` writes), undone after the
    test, so that parsing with DeepSpeed or FSDP in the test process leaves nothing behind."""
    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    set_launcher_environment(["--deepspeed", "ds_configs/zero2.json"])
    written = {key: os.environ.pop(key) for key in LAUNCHER_VARIABLES}
    for key, value in written.items():
        monkeypatch.setenv(key, value)


def parse_refusal(capsys, parse, *args) -> str:
    """The one error line of a command line the parser refuses (exit 2); `parse(*args)` parses it."""
    with pytest.raises(SystemExit) as stop:
        parse(*args)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0]
    return lines[0]


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str):
    """A tmpfs of `size` (e.g. "80m") mounted on `folder` for the block: a disk that fills up; the test is
    skipped where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
