"""Print pip constraints that pin every dependency of pyproject.toml, and of the extras named on the command line, to
its declared lower bound. `scripts/_venv.sh` installs the lowest-versions venv with them, so the lower bounds the
package declares are versions the tests run at. Standard library only: it runs before anything is installed."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
lines = list(project["dependencies"])
for extra in sys.argv[1:]:
    lines += project["optional-dependencies"][extra]
pins = {}
for line in lines:
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)", line)
    name, specifier = match.group(1).lower().replace("_", "-"), match.group(2)
    lower = re.search(r">=\s*([0-9][^,;\s]*)", specifier)
    if lower is None:
        sys.exit(f"{line}: no lower bound to test")
    pins[name] = lower.group(1)
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
