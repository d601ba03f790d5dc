"""Parses documented recipe command lines in one process; prints one JSON result per command.

    python tests/drivers/check_commands.py '[["finetune_hf_trainer_docvqa.py", ["--bf16", ...], 8], ...]'

The world size of each command's launcher is given to the batch-size check without starting 8 processes;
DeepSpeed's process group is the single local one that a plain `python` run would create. The commands are
written for GPU nodes with requirements-gpu.txt installed, so the check that --use_flash_attention has a GPU and
the flash-attn package is left out here (tests/test_options.py tests it); every other flag parses as it would.
"""

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import common.training.arguments  # noqa: E402

common.training.arguments.FinetuneArguments.check_flash_attention = lambda self: None

results = []
for script, argv, world_size in json.loads(sys.argv[1]):
    common.training.arguments.world_size_from_env = lambda size=world_size: size
    module = __import__(script.removesuffix(".py"))
    dataclass_types = [v for name, v in vars(module).items() if name.endswith("Arguments") and isinstance(v, type)]
    try:
        common.training.arguments.set_launcher_environment(argv)
        common.training.arguments.parse_args(*dataclass_types, argv=argv)
        results.append({"command": [script, *argv], "ok": True})
    except SystemExit as stop:
        results.append({"command": [script, *argv], "ok": stop.code == 0, "exit": stop.code})
print(json.dumps(results))
