"""The package's import graph reads data -> models -> commands: no import goes back up a layer, nothing imports the
repository's `training/` or `benchmarks/`, the package assumes no repository layout, and the top-level modules have
no import cycle. Imports are read from the source (ast), function-level (lazy) imports included."""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "calm_hf"

# the remote-code files saved next to checkpoints (presets.py travels with the configurations)
MODEL_FILES = {"calm_hf.modeling_calm", "calm_hf.modeling_calm_behavior", "calm_hf.modeling_calm_tokenizer",
               "calm_hf.configuration_calm", "calm_hf.configuration_calm_tokenizer", "calm_hf.presets",
               "calm_hf.validation_calm", "calm_hf.generation_calm", "calm_hf.sessions_calm",
               "calm_hf.augmentation_calm", "calm_hf.checked_loading", "calm_hf.validation_calm_tokenizer",
               "calm_hf.heads_calm", "calm_hf.identity_calm"}
# what the data layer (and the metrics) may not reach: models, training, evaluation, orchestration, commands
ABOVE_DATA = {"calm_hf.modeling_calm", "calm_hf.modeling_calm_behavior", "calm_hf.modeling_calm_tokenizer",
              "calm_hf.heads_calm", "calm_hf.identity_calm",
              "calm_hf.validation_calm", "calm_hf.generation_calm", "calm_hf.sessions_calm", "calm_hf.augmentation_calm",
              "calm_hf.checked_loading", "calm_hf.validation_calm_tokenizer", "calm_hf.forecasting",
              "calm_hf.pipeline_neural_forecasting", "calm_hf.trainer", "calm_hf.evaluation", "calm_hf.publish",
              "calm_hf.checkpoint", "calm_hf.analysis", "calm_hf.baselines", "calm_hf.commands", "calm_hf.cli",
              "calm_hf.figures", "calm_hf.callbacks", "calm_hf.identity_init"}
COMMAND_LAYER = {"calm_hf.commands", "calm_hf.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (absolute names; `from x import y` also yields `x.y`, which may be a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def top_level(name: str) -> str:
    """calm_hf.data.io -> calm_hf.data; calm_hf.forecasting -> calm_hf.forecasting; calm_hf -> calm_hf."""
    return ".".join(name.split(".")[:2])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in imports_of(path) if t in modules and t != name} for name, path in modules.items()}


def test_the_walker_sees_lazy_and_relative_imports(graph):
    # a function-level relative import (cli imports the commands lazily, by importlib) and a top-level one
    assert "calm_hf.configuration_calm" in graph["calm_hf.modeling_calm"]
    assert "calm_hf.publish" in graph["calm_hf.commands.main"]  # imported inside run_job
    assert "calm_hf.commands" in graph["calm_hf.cli"]


def test_nothing_imports_training_or_benchmarks():
    for path in PACKAGE.rglob("*.py"):
        bad = {name for name in imports_of(path) if name.split(".")[0] in ("training", "benchmarks")}
        assert not bad, f"{path} imports {bad}"
        text = path.read_text()
        # no file-path loading of repository scripts, no repository-layout walk from __file__
        assert "spec_from_file_location" not in text, path
        assert not re.search(r"parents\[[2-9]\]", text), f"{path} assumes the repository layout"


def test_data_and_metrics_import_nothing_above_them(graph):
    for name, targets in graph.items():
        if top_level(name) in ("calm_hf.data", "calm_hf.metrics"):
            bad = {t for t in targets if top_level(t) in ABOVE_DATA}
            assert not bad, f"{name} imports {bad} (data/metrics sit below the models)"


def test_model_files_import_only_each_other(graph):
    for name in MODEL_FILES:
        assert graph[name] <= MODEL_FILES, f"{name} imports {graph[name] - MODEL_FILES}"


def test_only_commands_import_commands(graph):
    for name, targets in graph.items():
        if top_level(name) in COMMAND_LAYER:
            continue
        bad = {t for t in targets if top_level(t) in COMMAND_LAYER}
        assert not bad, f"{name} imports {bad}: the library never calls up into the command layer"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph `edges` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_cycles_among_top_level_modules(graph):
    collapsed: dict[str, set[str]] = {}
    for name, targets in graph.items():
        collapsed.setdefault(top_level(name), set()).update(top_level(t) for t in targets if top_level(t) != top_level(name))
    cycle = find_cycle(collapsed)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_cycles_among_any_modules(graph):
    """Also inside the subpackages (the readers build on `data/io.py`; `data/readers.py` dispatches above them)."""
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
