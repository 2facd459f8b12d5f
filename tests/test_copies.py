"""Blocks copied between the self-contained model files stay identical to their source (transformers' check_copies).

The modeling and configuration files are saved next to checkpoints as remote code and may import only each other,
torch, transformers and the stdlib, so shared helpers are copied. Each copy carries a comment on the line above it:

    # Copied from calm_hf.<module>.<Name>[ with Old->New]

and must equal the source object's code (decorators included) after the optional `Old->New` renaming.
"""

import ast
import re
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "calm_hf"
MARKER = re.compile(r"^# Copied from calm_hf\.(\w+)\.(\w+)(?: with (\w+)->(\w+))?\s*$")
# the copies the remote-code layout needs; the test fails if one loses its marker
EXPECTED_COPIES = {
    ("modeling_calm_tokenizer", "apply_rotary_to_heads"),
    ("modeling_calm_tokenizer", "eager_attention_forward"),
    ("modeling_calm_tokenizer", "decode_step_attention"),
    ("modeling_calm_tokenizer", "CalmTokenizerRotaryEmbedding"),
    ("configuration_calm_tokenizer", "plain_validation_errors"),
}


def top_level_sources(module: str, package: Path = PACKAGE) -> dict[str, tuple[int, str]]:
    """Name -> (first line number, source text with decorators) of every top-level function and class of a module."""
    text = (package / f"{module}.py").read_text()
    lines = text.splitlines()
    sources = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            sources[node.name] = (start, "\n".join(lines[start - 1 : node.end_lineno]))
    return sources


def marked_copies() -> list[tuple[str, str, str, str, str | None, str | None]]:
    """(module, name, source module, source name, old, new) for every `# Copied from` marker in the package."""
    copies = []
    for path in sorted(PACKAGE.glob("*.py")):
        module = path.stem
        lines = path.read_text().splitlines()
        for name, (start, _) in top_level_sources(module).items():
            match = MARKER.match(lines[start - 2]) if start >= 2 else None
            if match:
                copies.append((module, name, *match.groups()))
        markers = sum(bool(MARKER.match(line)) for line in lines)
        found = sum(copy[0] == module for copy in copies)
        assert markers == found, f"{path.name}: a `# Copied from` marker is not directly above a function or class"
    return copies


def test_every_needed_copy_is_marked():
    marked = {(module, name) for module, name, *_ in marked_copies()}
    assert EXPECTED_COPIES <= marked, EXPECTED_COPIES - marked


def drift(copy: tuple, package: Path = PACKAGE) -> str | None:
    """None when the copy equals its source (after `Old->New`), else a message saying what drifted."""
    module, name, source_module, source_name, old, new = copy
    sources = top_level_sources(source_module, package)
    if source_name not in sources:
        return f"{module}.{name} names a source calm_hf.{source_module}.{source_name} that is gone"
    expected = sources[source_name][1]
    if old is not None:
        expected = expected.replace(old, new)
    if top_level_sources(module, package)[name][1] != expected:
        return (
            f"calm_hf.{module}.{name} drifted from calm_hf.{source_module}.{source_name}"
            f"{f' (with {old}->{new})' if old else ''}: edit the source and copy it again"
        )
    return None


@pytest.mark.parametrize("copy", marked_copies(), ids=lambda copy: f"{copy[0]}.{copy[1]}")
def test_marked_copy_is_identical_to_its_source(copy):
    assert drift(copy) is None, drift(copy)


def test_the_check_sees_a_drifted_copy(tmp_path):
    # guard against a check that cannot fail: one changed character in a copy must be reported
    for path in PACKAGE.glob("*.py"):
        (tmp_path / path.name).write_text(path.read_text())
    tokenizer_file = tmp_path / "modeling_calm_tokenizer.py"
    tokenizer_file.write_text(tokenizer_file.read_text().replace("torch.sub(first * cos, second * sin,", "torch.add(first * cos, second * sin,"))
    copy = next(c for c in marked_copies() if c[:2] == ("modeling_calm_tokenizer", "apply_rotary_to_heads"))
    assert drift(copy, tmp_path) is not None and drift(copy, PACKAGE) is None
