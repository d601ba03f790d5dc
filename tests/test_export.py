"""Outputs in the official checkpoint's format (common/outputs/export.py) and the export command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from common.model import official_format
from common.model.configuration_phi3v import Phi3VConfig
from common.model.modeling_phi3v import Phi3VForCausalLM
from common.model.processing_phi3v import Phi3VProcessor, load_tokenizer
from common.outputs import export
from common.training.model_setup import save_adapter_weights_only

from .recipe_utils import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "official_config.json"
# Written by transformers 4.38 into the published file; not part of the config's content.
PROVENANCE_KEYS = {"_name_or_path"}
CODE_FILES = ("configuration_phi3_v.py", "image_processing_phi3_v.py", "modeling_phi3_v.py", "processing_phi3_v.py")
HUB_ID = "microsoft/Phi-3.5-vision-instruct"
TEXTS = [
    "<|user|>\n<|image_1|>\nWhat is the date mentioned in this letter? Answer briefly.<|end|>\n<|assistant|>\n",
    "March 5, 1998<|end|>\n<|endoftext|>",
    "  leading spaces, ünïcödé and 3.14 $12.50<|system|>x",
]


def keys_and_forms(config: dict) -> dict:
    return {key: type(value).__name__ for key, value in config.items() if key not in PROVENANCE_KEYS}


def weight_names(folder: Path) -> dict[str, str]:
    names = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names.update({name: str(handle.get_slice(name).get_dtype()) for name in handle.keys()})
    return names


@pytest.fixture(scope="module")
def base(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with stand-ins for the checkpoint's own code files, as a local base folder."""
    folder = tmp_path_factory.mktemp("base") / "phi3v"
    shutil.copytree(tiny_checkpoint, folder)
    for name in CODE_FILES:
        (folder / name).write_text(f"# stand-in for the checkpoint's {name}\nVALUE = {len(name)}\n")
    return folder


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    """A final model written from the base: (folder, the in-memory model it was written from)."""
    model = Phi3VForCausalLM.from_pretrained(base).eval()
    processor = Phi3VProcessor.from_pretrained(base, num_crops=2)
    folder = tmp_path_factory.mktemp("exported")
    official_format.write_final_model(model, processor, folder, base, dtype=torch.float32)
    return folder, model


def test_official_dict_has_the_published_keys_and_forms():
    published = json.loads(FIXTURE.read_text())
    written = Phi3VConfig(**published).official_dict()
    source_dependent = {"auto_map", "_attn_implementation"}
    expected = {key: form for key, form in keys_and_forms(published).items() if key not in source_dependent}
    assert keys_and_forms(written) == expected
    assert written["rope_scaling"] == published["rope_scaling"] and written["rope_theta"] == published["rope_theta"]
    assert written["torch_dtype"] == "bfloat16" and written["embd_layer"] == published["embd_layer"]
    assert Phi3VConfig(**written).to_dict() == {**Phi3VConfig(**published).to_dict(), "_name_or_path": ""}


def test_output_config_matches_the_published_file_and_reloads_with_identical_logits(exported, base):
    folder, model = exported
    published = json.loads(FIXTURE.read_text())
    written = json.loads((folder / "config.json").read_text())
    # Only the tiny tower needs vision_config; the published file implies CLIP ViT-L/14-336.
    assert keys_and_forms({k: v for k, v in written.items() if k != "vision_config"}) == keys_and_forms(published)
    assert written["auto_map"] == json.loads((base / "config.json").read_text())["auto_map"]
    assert written["use_cache"] is True and written["torch_dtype"] == "float32"
    reloaded = Phi3VForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 32010, 450, 1243, 29871, 13, 32007, 32001]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_output_carries_the_base_code_weight_names_and_stop_ids(exported, base):
    folder, _ = exported
    for name in CODE_FILES:
        assert (folder / name).read_bytes() == (base / name).read_bytes()
    # The unused last CLIP layer and post_layernorm come back from the base: the names are exactly the base's.
    assert set(weight_names(folder)) == set(weight_names(base))
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [32007, 32000, 2] and generation["_from_model_config"] is False
    image_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert image_config["num_crops"] == 2
    assert image_config["auto_map"] == json.loads((base / "preprocessor_config.json").read_text())["auto_map"]
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor"
    }
    assert all(path.stat().st_mode & 0o777 == 0o666 & ~current_umask() for path in folder.iterdir())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_tokenizer_files_are_the_official_form_and_tokenize_as_the_base(exported, base):
    folder, _ = exported
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and "backend" not in config
    assert config["chat_template"] and config["add_bos_token"] is True and config["add_eos_token"] is False
    assert {config["added_tokens_decoder"][str(i)]["content"] for i in (32000, 32001, 32007, 32010)} == {
        "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"
    }
    added = json.loads((folder / "added_tokens.json").read_text())
    assert added["<|end|>"] == 32007 and min(added.values()) == 32000
    assert json.loads((folder / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"
    ours, theirs = load_tokenizer(folder), load_tokenizer(base)
    as_written = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids == as_written.encode(text).ids
    messages = [{"role": "user", "content": "<|image_1|>\nhi"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<|user|>\n<|image_1|>\nhi<|end|>\n<|assistant|>\n"


TRANSFORMERS4 = REPO_ROOT / ".venv" / "transformers4"
TRANSFORMERS4_CHECK = """
import json, sys
import transformers
from transformers import AutoTokenizer, GenerationConfig
assert transformers.__version__.startswith("4."), transformers.__version__
folder, texts = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder)
chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
print(json.dumps({"class": type(tokenizer).__name__, "ids": [tokenizer(t).input_ids for t in texts], "chat": chat,
                  "eos": GenerationConfig.from_pretrained(folder).eos_token_id}))
"""


@pytest.mark.skipif(not TRANSFORMERS4.is_dir(), reason="transformers 4.x is installed into .venv/transformers4 by tools/setup_env.sh")
def test_transformers4_reads_the_tokenizer_and_generation_config(exported, tmp_path):
    folder, _ = exported
    env = {**os.environ, "PYTHONPATH": str(TRANSFORMERS4), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", TRANSFORMERS4_CHECK, str(folder), json.dumps(TEXTS)],
                            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    ours = load_tokenizer(folder)
    assert seen["class"] == "LlamaTokenizerFast"
    assert seen["ids"] == [ours(text).input_ids for text in TEXTS]
    assert seen["chat"] == "<|user|>\nhi<|end|>\n<|assistant|>\n" and seen["eos"] == [32007, 32000, 2]


def test_a_hub_base_gives_local_auto_map_entries_and_its_cached_code(exported, base, tmp_path, monkeypatch):
    """The base as the hub cache holds it (offline): the folder gets the commit's code files and local entries."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--microsoft--Phi-3.5-vision-instruct" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "generation_config.json", *CODE_FILES):
        shutil.copyfile(base / name, snapshot / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = tmp_path / "out"
    shutil.copytree(exported[0], folder)
    for name in CODE_FILES:
        (folder / name).unlink()
    processor = Phi3VProcessor.from_pretrained(folder)
    processor.source = HUB_ID
    processor.save_pretrained(folder)
    official_format.complete_model_folder(folder, HUB_ID, processor.tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == json.loads((base / "config.json").read_text())["auto_map"]
    assert config["_name_or_path"] == HUB_ID and config["_revision"] == commit
    for name in ("preprocessor_config.json", "processor_config.json"):
        assert json.loads((folder / name).read_text())["auto_map"] == json.loads((base / name).read_text())["auto_map"]
    assert all((folder / name).read_bytes() == (base / name).read_bytes() for name in CODE_FILES)


def make_adapter(base: Path, folder: Path) -> Path:
    """A LoRA adapter on the base as the recipes build one (lm_head among the targets), with trained-looking B."""
    from peft import LoraConfig, get_peft_model

    from common.training.model_setup import DECODER_LORA_TARGETS, VISION_LORA_TARGETS

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=f"{DECODER_LORA_TARGETS}|{VISION_LORA_TARGETS}", task_type="CAUSAL_LM")
    model = get_peft_model(Phi3VForCausalLM.from_pretrained(base), config)
    save_adapter_weights_only(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    model.save_pretrained(folder)
    Phi3VProcessor.from_pretrained(base, num_crops=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return make_adapter(base, tmp_path_factory.mktemp("adapter") / "lora")


def test_adapter_holds_only_lora_tensors(adapter):
    names = weight_names(adapter)
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert any("lm_head.lora_B" in name for name in names), "lm_head is a LoRA target, so it has adapters"


def test_export_merges_an_adapter_into_an_official_folder_and_refuses_to_overwrite(adapter, base, tmp_path, capsys):
    out = tmp_path / "merged"
    export.main(["--adapter", str(adapter), "--out", str(out), "--save_dtype", "bfloat16"])
    assert set(weight_names(out)) == set(weight_names(base)) and set(weight_names(out).values()) == {"BF16"}
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["rope_scaling"]["type"] == "su"
    assert all((out / name).is_file() for name in CODE_FILES)
    assert json.loads((out / "preprocessor_config.json").read_text())["num_crops"] == 1

    from peft import PeftModel

    expected = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged = Phi3VForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor.to(torch.bfloat16).float()), name

    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        export.main(["--adapter", str(adapter), "--out", str(out)])
    assert refused.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "already exists" in message and "--overwrite" in message
    export.main(["--adapter", str(adapter), "--out", str(out), "--overwrite"])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32", "the base's dtype by default"
    assert not list(tmp_path.glob(".merged.*")), "no staging folder is left behind"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("not_a_run", "has no adapter_config.json"),
        ("no_base", "names no base model"),
        ("base_gone", "does not exist; pass --base"),
        ("into_input", "would replace the input"),
    ],
)
def test_bad_export_inputs_are_one_line_errors(adapter, tmp_path, capsys, case, message):
    argv = {"missing": ["--adapter", str(tmp_path / "nothing")], "not_a_run": ["--adapter", str(tmp_path)]}.get(case)
    if case in ("no_base", "base_gone"):
        broken = tmp_path / "adapter"
        shutil.copytree(adapter, broken)
        config = json.loads((broken / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = None if case == "no_base" else str(tmp_path / "deleted-base")
        (broken / "adapter_config.json").write_text(json.dumps(config))
        argv = ["--adapter", str(broken)]
    out = ["--out", str(adapter), "--overwrite"] if case == "into_input" else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stopped:
        export.main((argv or ["--adapter", str(adapter)]) + out)
    assert stopped.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("error: ") and message in error
