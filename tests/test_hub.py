"""Tests for calm_hf.hub against the fake Hub in tests/hub_server.py.

Client code runs in subprocesses (`run_in_hub_env`): huggingface_hub and datasets read HF_ENDPOINT / HF_TOKEN /
HF_HUB_DISABLE_XET at import, and this pytest process has already imported them in offline mode.
"""

import json
import socket

import pytest

from calm_hf.commands.push import main
from calm_hf.hub import CalmHubError, push_to_hub, stage_for_upload
from hub_server import hub_server, run_in_hub_env  # noqa: F401  (fixture)

PUSH_AND_READ_BACK = r'''
import hashlib, json, os, sys
from pathlib import Path

import numpy as np
import datasets
import torch
from transformers import AutoModel, GPT2Config, GPT2Model

from calm_hf.cards import render_dataset_card, render_model_card
from calm_hf.hub import push_to_hub

work = Path(sys.argv[1])
torch.manual_seed(0)
model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=16, n_positions=16))
model.save_pretrained(work / "model")  # safetensors
(work / "model" / "checkpoint-5").mkdir()
(work / "model" / "checkpoint-5" / "optimizer.pt").write_bytes(b"not for the hub")
card = render_model_card({"pearson_r": 0.4321, "mse": 0.812}, {"hidden_size": 16}, {"steps": 10},
                         repo_id="calm-tester/tiny-calm", dataset_repo_id="calm-tester/tiny-calm-data")
card.save(work / "model" / "README.md")
card.validate()  # the Hub's metadata check (the fake Hub's validate-yaml)

features = datasets.Features({"input_ids": datasets.Array2D(shape=(None, 5), dtype="int16"),
                              "session_ids": datasets.Value("int64")})
rng = np.random.default_rng(0)
rows = lambda n: {"input_ids": [rng.integers(0, 16, size=(3, 5), dtype=np.int16) for _ in range(n)],
                  "session_ids": list(range(n))}
dataset = datasets.DatasetDict(train=datasets.Dataset.from_dict(rows(6), features=features),
                               test=datasets.Dataset.from_dict(rows(2), features=features))
dataset.save_to_disk(work / "data")
render_dataset_card(dataset, {"num_neurons": 3}, repo_id="calm-tester/tiny-calm-data").save(work / "data" / "README.md")

first = push_to_hub(work / "model", "tiny-calm", dataset_dir=work / "data", dataset_repo_id="tiny-calm-data")
second = push_to_hub(work / "model", "calm-tester/tiny-calm", dataset_dir=work / "data",
                     dataset_repo_id="calm-tester/tiny-calm-data")

from huggingface_hub import HfApi, hf_hub_download, snapshot_download, DatasetCard, ModelCard

downloaded = hf_hub_download("calm-tester/tiny-calm", "model.safetensors")
snapshot = Path(snapshot_download("calm-tester/tiny-calm"))
local_files = sorted(p.relative_to(work / "model").as_posix() for p in (work / "model").rglob("*") if p.is_file())
same_bytes = {name: (snapshot / name).read_bytes() == (work / "model" / name).read_bytes()
              for name in local_files if (snapshot / name).exists()}
reloaded = AutoModel.from_pretrained("calm-tester/tiny-calm")
same_weights = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))

loaded = datasets.load_dataset("calm-tester/tiny-calm-data")
same_values = all(
    np.array_equal(np.asarray(loaded[split]["input_ids"]), np.asarray(dataset[split]["input_ids"]))
    and loaded[split]["session_ids"] == dataset[split]["session_ids"] for split in dataset)
remote_card = DatasetCard.load(hf_hub_download("calm-tester/tiny-calm-data", "README.md", repo_type="dataset"))
print(json.dumps({
    "first": first, "second": second,
    "downloaded_equal": Path(downloaded).read_bytes() == (work / "model" / "model.safetensors").read_bytes(),
    "snapshot_files": sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()),
    "local_files": local_files, "same_bytes": same_bytes, "same_weights": same_weights,
    "features_equal": {split: loaded[split].features == dataset[split].features for split in dataset},
    "num_rows": {split: loaded[split].num_rows for split in loaded}, "same_values": same_values,
    "card_has_dataset_info": "dataset_info" in remote_card.data.to_dict(),
    "card_text_ours": "Generation parameters" in remote_card.text,
    "model_card_metadata": ModelCard.load(snapshot / "README.md").data.to_dict(),
}))
'''

ERRORS = r'''
import json
from calm_hf.commands.push import main
from calm_hf.hub import CalmHubError, push_to_hub
import sys
messages = {}
for name, kwargs in [("no_token", {}), ("bad_token", {"token": "hf_wrong"})]:
    try:
        push_to_hub(sys.argv[1], "x/y", **kwargs)
        messages[name] = None
    except CalmHubError as error:
        messages[name] = str(error)
messages["cli_exit"] = main([sys.argv[1], "x/y"])
print(json.dumps(messages))
'''


@pytest.fixture
def checkpoint_dir(tmp_path):
    folder = tmp_path / "calm-base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.slow
def test_push_download_and_load_back(hub_server, tmp_path):
    done = run_in_hub_env(PUSH_AND_READ_BACK, hub_server, args=[str(tmp_path)], timeout=240)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["first"]["model_repo_id"] == "calm-tester/tiny-calm"  # bare name went under the token's user
    assert result["first"]["dataset_repo_id"] == "calm-tester/tiny-calm-data"
    # Idempotent: the second push found nothing to change and created no commit.
    assert result["second"]["model_commit"] == result["first"]["model_commit"]
    assert result["second"]["dataset_commit"] == result["first"]["dataset_commit"]
    server = hub_server.server
    model_commits = server.num_commits("calm-tester/tiny-calm")
    assert model_commits == 2  # repo creation + one upload

    assert result["downloaded_equal"] and result["same_weights"]
    uploaded = [name for name in result["local_files"] if not name.startswith("checkpoint-")]
    assert sorted(result["snapshot_files"]) == sorted(uploaded + [".gitattributes"])  # training leftovers skipped
    assert result["same_bytes"] == {name: True for name in uploaded}
    assert "checkpoint-5/optimizer.pt" not in server.files("calm-tester/tiny-calm")

    assert result["features_equal"] == {"train": True, "test": True}  # Array2D survived the card merge
    assert result["num_rows"] == {"train": 6, "test": 2} and result["same_values"]
    assert result["card_has_dataset_info"] and result["card_text_ours"]
    metadata = result["model_card_metadata"]
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.4321
    assert server.files("calm-tester/tiny-calm-data", "dataset")["README.md"].decode().count("dataset_info") == 1


@pytest.mark.slow
def test_no_token_and_bad_token_messages(hub_server, checkpoint_dir, tmp_path):
    done = run_in_hub_env(ERRORS, hub_server, token=None, args=[str(checkpoint_dir)], hf_home=tmp_path / "home")
    messages = json.loads(done.stdout.strip().splitlines()[-1])
    assert "no Hugging Face token" in messages["no_token"] and "HF_TOKEN" in messages["no_token"]
    assert "login" in messages["no_token"]
    assert "rejected the token" in messages["bad_token"] and "HF_TOKEN" in messages["bad_token"]
    assert messages["cli_exit"] == 1
    assert "calm push: error: Cannot push: no Hugging Face token" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_connection_refused_message(checkpoint_dir):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    script = (
        "import sys\nfrom calm_hf.hub import CalmHubError, push_to_hub\n"
        "try:\n    push_to_hub(sys.argv[1], 'x/y')\nexcept CalmHubError as error:\n    print(error)\n"
    )
    done = run_in_hub_env(script, closed_endpoint, args=[str(checkpoint_dir)], extra_env={"HF_HUB_ETAG_TIMEOUT": "2"})
    assert "could not reach the Hub at " + closed_endpoint in done.stdout
    assert "HF_ENDPOINT" in done.stdout and "HF_HUB_OFFLINE" in done.stdout


def test_offline_mode_message(checkpoint_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalmHubError, match="unset HF_HUB_OFFLINE"):
        push_to_hub(checkpoint_dir, "x/y", token="hf_anything")
    assert isinstance(CalmHubError("x"), ValueError) and isinstance(CalmHubError("x"), RuntimeError)
    assert main([str(checkpoint_dir), "x/y", "--token", "hf_anything"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_missing_folders_are_clear(tmp_path, checkpoint_dir):
    with pytest.raises(CalmHubError, match="does not exist"):
        push_to_hub(tmp_path / "nope", "x/y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalmHubError, match="save_pretrained"):
        push_to_hub(tmp_path / "empty", "x/y")
    with pytest.raises(CalmHubError, match="save_to_disk"):
        push_to_hub(checkpoint_dir, "x/y", dataset_dir=tmp_path / "nope")


def test_stage_for_upload_skips_training_leftovers(checkpoint_dir, tmp_path):
    (checkpoint_dir / "model.safetensors").write_bytes(b"weights")
    (checkpoint_dir / "tokenizer").mkdir()
    (checkpoint_dir / "tokenizer" / "config.json").write_text("{}")
    (checkpoint_dir / "checkpoint-100").mkdir()
    (checkpoint_dir / "checkpoint-100" / "optimizer.pt").write_bytes(b"state")
    (checkpoint_dir / ".calm_stage.json").write_text("{}")
    staged = stage_for_upload(checkpoint_dir, tmp_path / "staging")
    assert staged == tmp_path / "staging" / "calm-base"
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert files == ["config.json", "model.safetensors", "tokenizer/config.json"]
    assert main([str(checkpoint_dir), "x/y", "--stage-only", "--staging-dir", str(tmp_path / "staging2")]) == 0
    assert (tmp_path / "staging2" / "calm-base" / "model.safetensors").read_bytes() == b"weights"


def test_fake_hub_rejects_invalid_card_metadata(hub_server):
    """The fake Hub's validate-yaml really validates, so the card check in the push test can fail."""
    script = (
        "from huggingface_hub import ModelCard\n"
        "for content in ('---\\nlicense: {name: apache}\\n---\\ntext', '---\\nlicense: apache-2.0\\n---\\ntext'):\n"
        "    try:\n        ModelCard(content).validate()\n        print('valid')\n"
        "    except ValueError as error:\n        print('invalid', str(error).replace(chr(10), ' '))\n"
    )
    done = run_in_hub_env(script, hub_server)
    first, second = done.stdout.strip().splitlines()
    assert first.startswith("invalid") and "license" in first
    assert second == "valid"
