"""Packaging: the wheel installed outside the checkout runs the CLI and the whole tiny pipeline; dependencies are
ranges whose lower bounds the installed versions satisfy; the console entries, the `calm` subcommands and the
recipes in `training/` agree with the package."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dependencies_are_ranges_whose_lower_bounds_are_installed():
    """The declared ranges are what the suite runs with: in the lowest-versions venv (CALM_DEPS=lowest, set by
    scripts/test.sh) every dependency is exactly at its lower bound, so a lower bound never claims support the tests
    did not see; elsewhere the installed versions lie inside the ranges. The Hugging Face libraries have an upper
    bound."""
    from importlib.metadata import version

    for line in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(line)
        assert "==" not in str(requirement.specifier), f"{line}: pins belong in scripts/_venv.sh, not the package"
        lower = [s for s in requirement.specifier if s.operator == ">="]
        assert lower, f"{line} has no lower bound"
        installed = Version(version(requirement.name).split("+")[0])
        assert installed >= Version(lower[0].version), f"{requirement.name} {installed} is below {line}"
        assert installed in requirement.specifier, f"installed {requirement.name} {installed} is outside {line}"
        if os.environ.get("CALM_DEPS") == "lowest":
            assert installed == Version(lower[0].version), f"{requirement.name} {installed} is not the lower bound of {line}"
    names = {Requirement(line).name for line in PYPROJECT["project"]["dependencies"]}
    for hf in ("transformers", "datasets", "huggingface_hub", "accelerate", "evaluate", "safetensors"):
        spec = next(Requirement(line).specifier for line in PYPROJECT["project"]["dependencies"]
                    if Requirement(line).name == hf)
        assert any(s.operator == "<" for s in spec), f"{hf} needs an upper bound (above the newest version tested)"
    assert "torch" in names
    # the CPU-only torch wheel is pinned by the set-up script, which installs it before the package
    assert re.search(r'pip install .*"torch==\d+\.\d+\.\d+"', (REPO / "scripts" / "_venv.sh").read_text())


def test_console_entries_match_the_calm_subcommands():
    from calm_hf.commands import COMMANDS

    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["calm"] == "calm_hf.cli:main"
    for command, module in COMMANDS.items():
        assert scripts[f"calm-{command}"] == f"calm_hf.commands.{module}:main"
    assert len(scripts) == len(COMMANDS) + 1


def test_packaged_recipe_files_are_the_recipes_and_valid_config_files():
    """`RECIPES[size]` is read from `calm_hf/recipes/main_<size>.json`, and that file given to `calm main --config`
    runs the same recipe as `--size <size>`."""
    from calm_hf.commands import parse_command_args
    from calm_hf.commands.main import RECIPE_FIELDS, RECIPES, MainArguments, recipe_path, resolve_recipe

    assert sorted(RECIPES) == ["cpu", "paper", "tiny"]
    for size, recipe in RECIPES.items():
        path = recipe_path(size)
        spelled = json.loads(path.read_text())
        assert recipe == {name: spelled.get(name) for name in RECIPE_FIELDS}
        (args,) = parse_command_args((MainArguments,), ["--config", str(path)])
        assert args.size == size and resolve_recipe(args) == recipe
        (args,) = parse_command_args((MainArguments,), ["--size", size])
        assert resolve_recipe(args) == recipe
    assert not list((REPO / "training" / "configs").glob("main_*.json")), "recipes live only in calm_hf/recipes/"


def test_a_recipe_file_with_an_unknown_field_is_refused(tmp_path, monkeypatch):
    from calm_hf.commands import recipes

    (tmp_path / "main_cpu.json").write_text(json.dumps({"size": "cpu", "pretrain_lr": 1e-3, "pretrain_lrr": 1}))
    monkeypatch.setattr(recipes, "recipe_path", lambda size: tmp_path / f"main_{size}.json")
    with pytest.raises(ValueError, match="pretrain_lrr"):
        recipes.load_recipe("cpu")


def test_config_file_flags_and_errors(tmp_path):
    from calm_hf.commands import parse_command_args
    from calm_hf.commands.main import MainArguments
    from calm_hf.commands.tokenize import TokenizeArguments

    config = tmp_path / "tokenize.json"
    config.write_text(json.dumps({"tokenizer_path": "tok", "trials_dataset": "trials", "output_dir": "out"}))
    (args,) = parse_command_args((TokenizeArguments,), ["--config", str(config), "--batch_size", "3"])
    assert (args.tokenizer_path, args.output_dir, args.batch_size) == ("tok", "out", 3)
    (args,) = parse_command_args((TokenizeArguments,), [str(config)])  # the lone-file form
    assert args.trials_dataset == "trials"
    (args,) = parse_command_args((TokenizeArguments,), ["--config", str(config), "--output_dir", "elsewhere"])
    assert args.output_dir == "elsewhere"  # the command line overrides the file
    (args,) = parse_command_args((MainArguments,), ["--size", "tiny", "--use_cpu"])
    assert args.use_cpu is True and parse_command_args((MainArguments,), [])[0].use_cpu is False
    config.write_text(json.dumps({"tokenizer_path": "tok", "batch": 3}))
    with pytest.raises(ValueError, match=r"\['batch'\]"):
        parse_command_args((TokenizeArguments,), ["--config", str(config)], prog="calm tokenize")
    with pytest.raises(FileNotFoundError, match="no such file"):
        parse_command_args((TokenizeArguments,), ["--config", str(tmp_path / "missing.json")])
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        parse_command_args((TokenizeArguments,), ["--config", str(config)])


def test_main_job_device_is_a_choice(tmp_path):
    """`--use_cpu` reaches the training stages only when asked; by default accelerate picks the device."""
    from calm_hf.commands.main import training_flags

    default = training_flags(tmp_path, 1.0, 4, 1e-3, 0, False, None)
    assert "--use_cpu" not in default
    assert "--use_cpu" in training_flags(tmp_path, 1.0, 4, 1e-3, 0, False, None, use_cpu=True)


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (the checkout stays clean), offline: no build isolation, so the
    installed setuptools builds it and nothing is downloaded."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(dist), str(source)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("calm_hf-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv outside the checkout with the wheel installed. torch, transformers, ... come from this interpreter's
    site-packages through a path line in a .pth file: a plain path, so the editable calm_hf install there (its own
    .pth) is not processed and only the wheel's calm_hf can be imported."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "_parent_site_packages.pth").write_text("\n".join(sorted(parents)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return venv


@pytest.mark.slow  # wheel build + venv + a tiny main job + a forecast: ~50 s on one core
def test_wheel_installed_outside_the_checkout_runs_the_tiny_pipeline(tmp_path):
    wheel = build_wheel(tmp_path)
    venv = fresh_venv(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")

    def run(*command: str) -> str:
        result = subprocess.run([str(venv / "bin" / command[0]), *command[1:]], cwd=work, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        return result.stdout

    location = run("python", "-c", "import calm_hf; print(calm_hf.__file__)").strip()
    assert Path(location).is_relative_to(venv), f"calm_hf imported from {location}, not from the installed wheel"
    assert "calm main" in run("calm", "--help")
    assert "--tokenized_dataset" in run("calm", "pretrain", "--help")
    assert "--tokenized_dataset" in run("calm-pretrain", "--help")
    run("calm", "main", "--size", "tiny", "--output_dir", "out", "--bf16", "false")
    model = work / "out" / "calm-base"
    assert (model / "model.safetensors").is_file() and (model / "README.md").is_file()
    assert "eval_results.json" in os.listdir(model)
    traces = np.random.default_rng(0).normal(size=(12, 48)).astype(np.float32)
    np.save(work / "traces.npy", traces)
    summary = run("calm", "forecast", "--model", "./out/calm-base", "--traces", "traces.npy", "--horizon", "8",
                  "--output", "forecast.npz")  # any recording: its identity comes from its own activity
    assert "wrote forecast.npz" in summary
    assert np.load(work / "forecast.npz")["forecast"].shape == (12, 8)


@pytest.mark.parametrize("command", ["main", "prepare", "train-tokenizer", "tokenize", "pretrain", "adapt",
                                     "finetune-behavior", "forecast", "push", "analyze"])
def test_every_command_has_help_and_a_config_flag(command, capsys):
    """`calm <command> --help` exits 0 through the package module (no file paths) and lists `--config`."""
    from calm_hf.cli import main

    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"calm {command}" in out and "--config" in out


def test_unknown_command_and_bad_flags_exit_codes(capsys):
    from calm_hf.cli import main

    assert main(["no-such-stage"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["tokenize", "--no_such_flag", "1"]) == 2


def test_training_launchers_call_the_package():
    for script in sorted((REPO / "training").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert "-m calm_hf.commands." in script.read_text(), script
    assert not list((REPO / "training").glob("*.py")), "training/ holds recipes and launchers, not code"
