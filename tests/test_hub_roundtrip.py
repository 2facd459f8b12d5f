"""Lossless hub round trips (fake hub on 127.0.0.1): the Trainer's push_to_hub=True pushes a complete checkpoint that
the pipeline loads from the hub id in a Python without calm_hf; a pushed tokenized dataset keeps its session metadata
and the commands read it by hub id; behaviour checkpoints load with trust_remote_code."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from calm_hf import CalmConfig, CalmForBehaviorRegression
from calm_hf.checkpoint import complete_checkpoint
from calm_hf.cli import main as calm
from hub_server import run_in_hub_env

BLOCK_CALM_HF = 'import sys; sys.modules["calm_hf"] = None  # a Python without calm_hf\n'
TRAIN_FLAGS = ["--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubrt")
    calm(["prepare", "--output_dir", str(root / "sim"), "--num_sessions", "2", "--num_neurons", "10", "--num_trials",
          "12", "--num_steps", "60"])
    calm(["train-tokenizer", "--trials_dataset", str(root / "sim"), "--output_dir", str(root / "tok"), "--preset", "tiny",
          "--max_steps", "2", "--per_device_train_batch_size", "32", "--save_strategy", "no", *TRAIN_FLAGS])
    calm(["tokenize", "--tokenizer_path", str(root / "tok"), "--trials_dataset", str(root / "sim"),
          "--output_dir", str(root / "sim-tok")])
    return root


@pytest.mark.slow  # ~1 min: three client processes against the fake hub
def test_trainer_push_and_dataset_round_trip(corpus, hub_server):
    root = corpus
    pretrain = ["pretrain", "--tokenized_dataset", str(root / "sim-tok"), "--tokenizer_path", str(root / "tok"),
                "--output_dir", str(root / "calm"), "--preset", "tiny", "--max_neurons", "8", "--max_steps", "2",
                "--per_device_train_batch_size", "4", "--forecast_eval_trials", "0", "--save_strategy", "no",
                "--push_to_hub", "--hub_model_id", "calm-tester/calm-trainer-push", *TRAIN_FLAGS]
    push = textwrap.dedent(
        f"""
        from calm_hf.cli import main
        from calm_hf.hub import push_to_hub
        main({pretrain!r})
        push_to_hub({str(root / 'calm')!r}, "calm-tester/calm-copy", dataset_dir={str(root / 'sim-tok')!r},
                    dataset_repo_id="calm-tester/calm-data")
        from huggingface_hub import HfApi
        print("FILES", sorted(HfApi().list_repo_files("calm-tester/calm-trainer-push")))
        """
    )
    result = run_in_hub_env(push, hub_server, timeout=300)
    files = result.stdout.split("FILES", 1)[1]
    for name in ("config.json", "model.safetensors", "tokenizer/config.json", "tokenizer/model.safetensors",
                 "preprocessor_config.json", "processing_calm.py", "pipeline_neural_forecasting.py", "forecasting.py",
                 "modeling_calm.py", "modeling_calm_tokenizer.py", "README.md"):
        assert f"'{name}'" in files, (name, files)

    load = BLOCK_CALM_HF + textwrap.dedent(
        """
        import numpy as np
        from transformers import pipeline
        forecaster = pipeline("neural-forecasting", model="calm-tester/calm-trainer-push", trust_remote_code=True)
        out = forecaster(np.random.randn(10, 93), sampling_rate=16.0, horizon=20)  # identity from the traces
        print("FORECAST", out["forecast"].shape)
        """
    )
    assert "FORECAST (10, 20)" in run_in_hub_env(load, hub_server, timeout=300).stdout

    local = json.loads((root / "sim-tok" / "calm_sessions.json").read_text())
    reread = textwrap.dedent(
        f"""
        import json
        from calm_hf.data import load_trial_corpus
        from calm_hf.cli import main
        corpus, sessions = load_trial_corpus("calm-tester/calm-data")
        print("SESSIONS", json.dumps([s.to_dict() for s in sessions]))
        assert 0 == main(["pretrain", "--tokenized_dataset", "calm-tester/calm-data", "--tokenizer_path", {str(root / 'tok')!r},
              "--output_dir", {str(root / 'from-hub')!r}, "--preset", "tiny", "--max_neurons", "8", "--max_steps", "1",
              "--per_device_train_batch_size", "4", "--forecast_eval_trials", "0", "--save_strategy", "no",
              "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]), "calm pretrain from the hub failed"
        print("PRETRAINED")
        """
    )
    out = run_in_hub_env(reread, hub_server, timeout=300).stdout
    pushed = json.loads(out.split("SESSIONS", 1)[1].splitlines()[0])
    assert pushed == local["calm_sessions"]
    assert "PRETRAINED" in out
    assert json.loads((root / "from-hub" / "config.json").read_text())["neuron_identity"] == "data"


@pytest.mark.slow
def test_behavior_checkpoint_loads_with_remote_code(tmp_path):
    torch.manual_seed(0)
    config = CalmConfig.from_preset("tiny", num_behavior_channels=2)
    model = CalmForBehaviorRegression(config).eval()
    model.save_pretrained(tmp_path)
    complete_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "custom_pipelines" not in config and "AutoModelForCausalLM" not in config["auto_map"]
    assert config["auto_map"]["AutoModelForTimeSeriesPrediction"] == "modeling_calm_behavior.CalmForBehaviorRegression"
    script = BLOCK_CALM_HF + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForTimeSeriesPrediction
        model = AutoModelForTimeSeriesPrediction.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        out = model(input_ids=torch.randint(0, 16, (1, 5, 6)))
        print("OK", type(model).__name__, tuple(out.predictions.shape))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK CalmForBehaviorRegression" in result.stdout
    from transformers import AutoModelForTimeSeriesPrediction

    assert isinstance(AutoModelForTimeSeriesPrediction.from_pretrained(tmp_path), CalmForBehaviorRegression)
