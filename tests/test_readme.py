"""Every command in README.md and in the scripts' docstrings is known to work: its flags parse (with the world
size its launcher gives), and commands that need a GPU or the hub at least answer --help.

Commands that run on CPU are exercised for real elsewhere: ./demo.sh by tests/test_demo.py, ./test.sh by CI,
the scripts' CPU smoke settings by the end-to-end tests.
"""

import json
import re
import shlex
import subprocess
import sys

import pytest

from .recipe_utils import REPO_ROOT, offline_env

SCRIPTS = sorted(path.name for path in REPO_ROOT.glob("finetune_hf_trainer_*.py"))
# The commands run as modules (as the README types them), and the module behind each, whose docstring documents it.
TOOLS = {"common.export": "common.outputs.export", "common.predict": "common.outputs.predict"}


def shell_commands(text: str) -> list[str]:
    """Command lines in ```bash blocks and indented docstring examples, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    if not blocks:
        blocks = [text]
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("torchrun ", "python ", "./")):
                commands.append(line)
    return commands


def documented_commands() -> list[tuple[str, str]]:
    sources = {"README.md": (REPO_ROOT / "README.md").read_text()}
    for script in SCRIPTS + ["convert_ucf101.py", *(module.replace(".", "/") + ".py" for module in TOOLS.values())]:
        sources[script] = (REPO_ROOT / script).read_text().split('"""')[1]
    return [(source, command) for source, text in sources.items() for command in shell_commands(text)]


def recipe_invocation(command: str):
    """(script, its arguments, world size) for a torchrun/python call of a recipe script, else None."""
    words = shlex.split(command)
    script_index = next((i for i, word in enumerate(words) if word in SCRIPTS), None)
    if script_index is None:
        return None
    launcher = " ".join(words[:script_index])
    nodes = int(re.search(r"--nnodes[= ](\d+)", launcher).group(1)) if "--nnodes" in launcher else 1
    per_node = int(re.search(r"--nproc_per_node[= ](\d+)", launcher).group(1)) if "--nproc_per_node" in launcher else 1
    return words[script_index], words[script_index + 1 :], nodes * per_node


COMMANDS = documented_commands()


def test_the_readme_and_docstrings_document_every_script():
    documented = {recipe_invocation(c)[0] for _, c in COMMANDS if recipe_invocation(c)}
    assert documented == set(SCRIPTS)
    assert any(c.startswith("./demo.sh") for _, c in COMMANDS) and any(c.startswith("./test.sh") for _, c in COMMANDS)


def test_documented_recipe_commands_parse(tmp_path):
    invocations = [recipe_invocation(c) for _, c in COMMANDS if recipe_invocation(c)]
    checker = REPO_ROOT / "tests" / "drivers" / "check_commands.py"
    result = subprocess.run([sys.executable, str(checker), json.dumps(invocations)], cwd=REPO_ROOT, env=offline_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(outcomes) == len(invocations) > 10
    failed = [o for o in outcomes if not o["ok"]]
    assert not failed, f"{failed}\n{result.stderr[-3000:]}"


# Each script run as `python SCRIPT --help` runs it (as __main__, with that argv), all in one process: a process
# of its own would pay the ~8 s of imports once per script.
HELP_OF_EACH = """
import contextlib, io, json, runpy, sys
answers = {}
for script in sys.argv[1:]:
    sys.argv, printed, code = [script, "--help"], io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    answers[script] = [code, printed.getvalue()]
print(json.dumps(answers))
"""


def test_help_answers(tmp_path):
    scripts = SCRIPTS + ["convert_ucf101.py"]
    result = subprocess.run([sys.executable, "-c", HELP_OF_EACH, *scripts], cwd=REPO_ROOT, env=offline_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(answers) == sorted(scripts)
    for script, (code, printed) in answers.items():
        assert code in (0, None), (script, code, result.stderr[-2000:])
        assert "--output_dir" in printed or "--out_dir" in printed, script


def test_documented_export_and_predict_commands_parse():
    import importlib

    parsed = 0
    for source, command in COMMANDS:
        words = shlex.split(command)
        for module_name, implementation in TOOLS.items():
            if module_name in words:
                module = importlib.import_module(implementation)
                try:
                    module.parse_args(words[words.index(module_name) + 1 :])
                except SystemExit as stop:
                    pytest.fail(f"{source}: `{command}` does not parse (exit {stop.code})")
                parsed += 1
    assert parsed >= 8


def test_the_layout_lists_every_module_of_common_in_its_folder():
    readme = (REPO_ROOT / "README.md").read_text()
    layout = readme[readme.index("`common/`, one folder a layer"):]
    layout = layout[layout.index("```") + 3:]
    layout = layout[:layout.index("```")]
    listed, folder = set(), ""
    for line in layout.splitlines():
        if re.match(r"^[a-z_]+/$", line):
            folder = line
        elif not line.startswith("  ") and line.strip():
            folder = ""
        for name in re.findall(r"(?:^|, |^  )([a-z_0-9]+\.py)", line):
            listed.add(f"{folder if line.startswith('  ') else ''}{name}")
    modules = {str(path.relative_to(REPO_ROOT / "common")) for path in (REPO_ROOT / "common").rglob("*.py")
               if path.name != "__init__.py"}
    assert listed == modules
