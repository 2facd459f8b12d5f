"""Print pip constraints that pin every dependency of pyproject.toml (and the extras named on the command line) to
its declared lower bound: `scripts/_venv.sh` installs the lowest-versions venv with them, so the lower bounds the
package declares are the versions the tests run at."""

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
lines = list(project["dependencies"])
for extra in sys.argv[1:]:
    lines += project["optional-dependencies"][extra]
pins = {}
for line in lines:
    requirement = Requirement(line)
    lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    if not lower:
        sys.exit(f"{line}: no lower bound to test")
    pins[requirement.name] = lower[0]
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
