"""Load a script of benchmarks/ as a module (they are scripts, not a package), once per test session."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str):
    """`benchmarks/<filename>` as module `calm_benchmarks_<stem>`; loaded once and cached in `sys.modules`."""
    name = f"calm_benchmarks_{Path(filename).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
