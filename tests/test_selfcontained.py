"""Every model folder a run writes is self-contained: a hub base's code travels with it (local auto_map, the
cached files byte for byte, its commit recorded), no auto_map entry points at a missing file, and every
checkpoint-N holds the base's full set of weight names."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from common.outputs import export

from .recipe_utils import REPO_ROOT, assert_ok, run_script

SCRIPT = "finetune_hf_trainer_docvqa.py"
HUB_ID = "phi3v-tests/tiny-vision"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REMOTE_CODE = REPO_ROOT / "tests" / "fixtures" / "remote_code"
CODE_FILES = sorted(path.name for path in REMOTE_CODE.glob("*.py"))
AUTO_MAP_FILES = ("config.json", "preprocessor_config.json", "processor_config.json")
TRANSFORMERS4 = REPO_ROOT / ".venv" / "transformers4"
pytestmark = pytest.mark.slow


def weight_names(folder: Path) -> set[str]:
    names = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def fake_hub_cache(hub: Path, checkpoint: Path, with_code: bool) -> Path:
    """`checkpoint` as the hub cache holds a downloaded repository: snapshots/COMMIT and refs/main."""
    repo = hub / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(checkpoint, snapshot)
    if with_code:
        for name in CODE_FILES:
            shutil.copyfile(REMOTE_CODE / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def auto_maps(folder: Path) -> dict[str, dict]:
    return {name: json.loads((folder / name).read_text()).get("auto_map") for name in AUTO_MAP_FILES if (folder / name).is_file()}


def dangling(folder: Path) -> list[str]:
    """auto_map entries of `folder` whose module file is not in `folder`."""
    return [
        f"{name}: {reference}"
        for name, auto_map in auto_maps(folder).items()
        for reference in (auto_map or {}).values()
        for item in (reference if isinstance(reference, list) else [reference])
        if item and not (folder / f"{item.rsplit('.', 1)[0]}.py").is_file()
    ]


@pytest.fixture(scope="module")
def docvqa_data(tmp_path_factory):
    from common.fixtures.synthetic import make_docvqa

    path = tmp_path_factory.mktemp("docvqa")
    make_docvqa(n=4, seed=0).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def hub_run(tiny_checkpoint, docvqa_data, tmp_path_factory):
    """One full fine-tuning run (the default: DeepSpeed ZeRO-2) from a hub id that only the offline hub cache
    serves, with the base's code files cached: (run folder, cached snapshot, tmp folder whose hf_home is HF_HOME)."""
    tmp = tmp_path_factory.mktemp("hub-run")
    snapshot = fake_hub_cache(tmp / "hf_home" / "hub", tiny_checkpoint, with_code=True)
    out = tmp / "out"
    args = [
        "--model_name_or_path", HUB_ID, "--dataset_path", docvqa_data, "--output_dir", out, "--num_crops", "1",
        "--max_steps", "2", "--save_steps", "1", "--batch_size", "2", "--dataloader_num_workers", "2",
        "--skip_eval_before", "--skip_eval_after", "--learning_rate", "1e-3",
    ]
    result = run_script(SCRIPT, args, tmp)
    assert_ok(result)
    return out, snapshot, tmp


def model_folders(out: Path) -> list[Path]:
    return [out, *sorted(out.glob("checkpoint-*"))]


def test_every_folder_carries_the_cached_code_with_a_local_auto_map_and_the_base_commit(hub_run):
    out, snapshot, _ = hub_run
    assert [p.name for p in model_folders(out)] == ["out", "checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-2" / "global_step2").is_dir(), "the default full fine-tuning runs DeepSpeed ZeRO-2"
    for folder in model_folders(out):
        for name in CODE_FILES:
            assert (folder / name).read_bytes() == (snapshot / name).read_bytes(), f"{folder.name}/{name}"
        assert auto_maps(folder) == auto_maps(snapshot), folder.name
        config = json.loads((folder / "config.json").read_text())
        assert config["_name_or_path"] == HUB_ID and config["_revision"] == COMMIT
    assert json.loads((out / "run.json").read_text())["base"] == {"model_name_or_path": HUB_ID, "revision": COMMIT}


def test_every_checkpoint_and_an_export_from_it_hold_exactly_the_base_weight_names(hub_run, tmp_path, caplog):
    out, snapshot, _ = hub_run
    names = weight_names(snapshot)
    assert len(names) == 76
    for folder in model_folders(out):
        assert weight_names(folder) == names, folder.name
    # The README's example: a checkpoint exported on its own, without --base and without the hub.
    with caplog.at_level(logging.WARNING):
        exported = export.export(None, str(out / "checkpoint-2"), str(tmp_path / "export"), None, None, False)
    assert weight_names(exported) == names
    assert auto_maps(exported) == auto_maps(snapshot) and not dangling(exported)
    assert all((exported / name).read_bytes() == (snapshot / name).read_bytes() for name in CODE_FILES)
    assert json.loads((exported / "config.json").read_text())["_revision"] == COMMIT
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "auto_map" in r.getMessage()]


TRANSFORMERS4_LOAD = """
import json, sys
import transformers
from transformers import AutoConfig, AutoProcessor
assert transformers.__version__.startswith("4."), transformers.__version__
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps({"config": type(config).__module__ + "." + type(config).__name__,
                  "processor": type(processor).__module__ + "." + type(processor).__name__,
                  "image_processor": type(processor.image_processor).__name__, "tokenizer": type(processor.tokenizer).__name__,
                  "num_crops": processor.image_processor.num_crops, "rope": config.rope_scaling["type"]}))
"""


@pytest.mark.skipif(not TRANSFORMERS4.is_dir(), reason="transformers 4.x is installed into .venv/transformers4 by tools/setup_env.sh")
def test_transformers4_loads_config_and_processor_with_the_carried_code_offline(hub_run, tmp_path):
    out, _, _ = hub_run
    for folder in (out, out / "checkpoint-1"):
        # An empty HF_HOME: nothing can come from the cache or the hub, only from the folder itself.
        env = {**os.environ, "PYTHONPATH": str(TRANSFORMERS4), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / folder.name)}
        result = subprocess.run([sys.executable, "-c", TRANSFORMERS4_LOAD, str(folder)], env=env, capture_output=True,
                                text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        seen = json.loads(result.stdout.strip().splitlines()[-1])
        assert seen["config"].endswith("configuration_phi3_v.Phi3VConfig") and seen["config"].startswith("transformers_modules.")
        assert seen["processor"].endswith("processing_phi3_v.Phi3VProcessor")
        assert seen["image_processor"] == "Phi3VImageProcessor" and seen["tokenizer"] == "LlamaTokenizerFast"
        assert seen["num_crops"] == 1 and seen["rope"] == "su"


def test_a_base_without_code_files_gives_no_dangling_auto_map_and_one_warning(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    """Offline with no code cached (a hub base), and a local folder without .py files (the tiny checkpoint)."""
    from huggingface_hub import constants

    fake_hub_cache(tmp_path / "hub", tiny_checkpoint, with_code=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for base, out in ((HUB_ID, tmp_path / "from-hub"), (None, tmp_path / "from-folder")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            export.export(None, str(tiny_checkpoint), str(out), base, None, False)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "trust_remote_code" in r.getMessage()]
        assert len(warnings) == 1 and "configuration_phi3_v.py" in warnings[0], warnings
        assert not dangling(out) and not list(out.glob("*.py"))
        assert all(auto_map is None for auto_map in auto_maps(out).values()), auto_maps(out)
        assert weight_names(out) == weight_names(tiny_checkpoint)
