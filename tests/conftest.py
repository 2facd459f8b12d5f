"""Shared test set-up: offline hub, few threads (2-core CI), the real-data location, the fake hub server."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the package finds real data through CALM_DATA_DIR (else ../shared/data of the working directory): pin it to the
# checkout's sibling folder so tests do not depend on where pytest is started
os.environ.setdefault("CALM_DATA_DIR", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# per-machine records (the bf16 decision) go to a scratch folder, so tests neither read nor leave a user's records
if "CALM_CACHE_DIR" not in os.environ:
    os.environ["CALM_CACHE_DIR"] = tempfile.mkdtemp(prefix="calm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CALM_CACHE_DIR"], True)

import pytest  # noqa: E402
from hub_server import hub_server, run_in_hub_env  # noqa: E402,F401
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data_dir():
    """`../shared/data` (or $CALM_DATA_DIR); tests that need it are skipped with the reason when it is absent."""
    from calm_hf.data import default_data_dir

    path = default_data_dir()
    if not path.is_dir():
        pytest.skip(f"real recordings not found at {path}; set CALM_DATA_DIR to the shared data folder")
    return path
