"""The README as a test: every shell command and every Python block of README.md runs, in order, in a scratch folder.

How it is shrunk (the commands are run as written, plus what `SHRINK` appends; argparse keeps the last value of a
repeated flag, so an appended `--preset tiny` overrides the README's `--preset cpu`):

- `bash scripts/main.sh` runs what the script runs after creating the venv: `calm main` (here `--size tiny`). `bash scripts/test.sh` runs what it
  runs, `python -m pytest`, on one small test file instead of the whole suite (which is what is running this test).
  Both scripts are checked with `bash -n`; the venv set-up they source is `scripts/_venv.sh`, not run here (it would
  reinstall the package).
- `source .venv/bin/activate` sources a stand-in that puts this interpreter's bin folder first on PATH; `pip install`
  lines are not run (the package under test is importable already).
- training commands get tiny presets and a few steps; `calm push` goes to the fake hub on 127.0.0.1.
- `../shared/data` is the real data folder (linked next to the scratch folder); without it the test is skipped.
"""

import os
import re
import time
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import DEFAULT_USER, hub_env

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]
# command prefix -> flags appended (or a replacement command line, for the two set-up scripts)
SHRINK = {
    "pip install": "true",  # the package is importable here already; the test never installs anything
    "bash scripts/main.sh": "calm main --size tiny --bf16 false",
    "bash scripts/test.sh": f"python -m pytest -q -p no:cacheprovider {REPO / 'tests' / 'test_readme.py'}::test_readme_has_the_documented_commands",
    "calm main": ["--size", "tiny", "--bf16", "false"],
    "calm train-tokenizer": ["--preset", "tiny", "--max_steps", "3", "--max_segments", "500", "--use_cpu", *TRAIN],
    "calm pretrain": ["--preset", "tiny", "--max_steps", "2", "--max_neurons", "8", "--forecast_eval_trials", "0",
                      "--per_device_train_batch_size", "4", *TRAIN],
    "torchrun": ["--preset", "tiny", "--max_steps", "1", "--max_neurons", "8", "--forecast_eval_trials", "0",
                 "--per_device_train_batch_size", "4", *TRAIN],
    "calm finetune-behavior": ["--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", *TRAIN],
    "calm analyze": ["--num_shuffles", "2", "--max_forecast_trials", "2"],
    "calm adapt": ["--max_steps", "2", "--adapt_max_steps", "2", "--adapt_eval_every", "1", "--max_neurons", "16",
                   "--per_device_train_batch_size", "4", "--use_cpu", *TRAIN],
}


def readme_blocks() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    return [(lang, body) for lang, body in re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.DOTALL)]


def shell_commands(body: str) -> list[str]:
    commands = []
    for line in body.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def shrunk(command: str) -> str:
    if command.startswith("calm push"):  # the README's placeholder namespace becomes the fake hub's user
        return command.replace("you/", f"{DEFAULT_USER}/")
    for prefix, extra in SHRINK.items():
        if command.startswith(prefix):
            return extra if isinstance(extra, str) else command + " " + shlex.join(extra)
    return command


GUIDES = sorted((REPO / "docs" / "guides").glob("*.md"))


def doc_blocks(path: Path) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in re.findall(r"```(bash|python)\n(.*?)```", path.read_text(), flags=re.DOTALL)]


def run_blocks(blocks, source: str, work: Path, env: dict, offline: dict, ran: list) -> None:
    """Run `blocks` of `source` in `work` as a user would: one shell per bash block, every Python block as a script."""
    for lang, body in blocks:
        if lang == "bash":
            # one shell per block, so `source .venv/bin/activate` carries over like in a terminal
            commands = [shrunk(c) for c in shell_commands(body)]
            for command in commands:
                if command in ran and not command.startswith("source"):
                    # a guide repeating a command already run in this folder (same inputs, same output folder):
                    # it has been tested; running it again would only cost time
                    print(f"   ran  {command}")
                    continue
                online = command.startswith("calm push")
                script = "set -euo pipefail\n" + "\n".join(
                    ["source .venv/bin/activate"] * any(c.startswith("source") for c in commands) + [command]
                )
                start = time.perf_counter()
                result = subprocess.run(["bash", "-c", script], cwd=work, env=env if online else env | offline,
                                        capture_output=True, text=True, timeout=600)
                print(f"{time.perf_counter() - start:6.1f} s  {command}")
                assert result.returncode == 0, f"{source} command failed: {command}\n{result.stderr[-4000:]}"
                ran.append(command)
        else:
            result = subprocess.run([sys.executable, "-c", body], cwd=work, env=env | offline, capture_output=True,
                                    text=True, timeout=600)
            assert result.returncode == 0, f"{source} Python block failed:\n{body}\n{result.stderr[-4000:]}"
            ran.append("<python block>")


def test_readme_has_the_documented_commands():
    blocks = readme_blocks()
    commands = [c for lang, body in blocks if lang == "bash" for c in shell_commands(body)]
    assert sum(lang == "python" for lang, _ in blocks) >= 1
    for expected in ("bash scripts/main.sh", "calm prepare", "calm forecast", "calm push --model_dir"):
        assert any(c.startswith(expected) for c in commands), expected
    assert {g.stem for g in GUIDES} >= {"forecast", "adapt", "behavior", "embeddings", "pretrain"}
    assert all(doc_blocks(guide) for guide in GUIDES), "a guide without a command or Python block"
    for script in ("main.sh", "test.sh", "_venv.sh"):
        subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)


@pytest.mark.slow  # a tiny main job, tokenizer, pretraining (also as two-process DDP), adaptation: ~2 min on 1 core
@pytest.mark.data
def test_every_readme_command_runs(tmp_path, shared_data_dir, hub_server):
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared").symlink_to(shared_data_dir.parent)  # ../shared/data as in a checkout
    (work / "training").symlink_to(REPO / "training")
    bin_dir = Path(sys.executable).parent
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / ".venv" / "bin" / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    env = hub_env(hub_server, hf_home=tmp_path / "hf-home")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    ran = []
    run_blocks(readme_blocks(), "README", work, env, offline, ran)
    # the task guides run in the same folder, after the README: calm-base (tiny) and ../shared/data are there
    for guide in GUIDES:
        run_blocks(doc_blocks(guide), f"docs/guides/{guide.name}", work, env, offline, ran)
    assert (work / "forecast.png").is_file() and (work / "runs" / "calm-zf" / "preprocessor_config.json").is_file()
    assert any(c.startswith("calm push") for c in ran) and "<python block>" in ran


def test_every_docs_python_block_runs(tmp_path):
    """The model page (docs/*.md): every Python block runs as written, in a scratch folder. The task guides
    (docs/guides/) need calm-base and the data, so they run after the README in `test_every_readme_command_runs`."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
                        "HF_HUB_OFFLINE": "1"}
    blocks = [(page, body) for page in sorted((REPO / "docs").glob("*.md"))
              for lang, body in re.findall(r"```(python)\n(.*?)```", page.read_text(), flags=re.DOTALL)]
    assert blocks, "docs/ has no Python block"
    for page, body in blocks:
        result = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{page.name} block failed:\n{body}\n{result.stderr[-3000:]}"


def test_readme_results_table_is_what_its_script_writes():
    """The README's results block is `benchmarks/readme_table.py`'s output for the committed results file, unchanged."""
    if not (REPO / "benchmarks" / "results" / "foundation.json").is_file():
        pytest.skip("benchmarks/results/foundation.json is not committed yet (python benchmarks/foundation.py)")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme_table.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
