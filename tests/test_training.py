"""Training commands: an interrupted pretraining resumed from its checkpoint ends with the same weights as an
uninterrupted run (CPU determinism), and the same module runs as two-process DDP under torchrun."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calm_hf.commands import prepare as prepare_command, pretrain as pretrain_command
from calm_hf.commands import tokenize as tokenize_command, train_tokenizer as train_tokenizer_command
from calm_hf.trainer import CalmTrainer


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A tiny simulated corpus, tokenized by a tiny tokenizer (the first stages of the main job)."""
    root = tmp_path_factory.mktemp("corpus")
    prepare_command.run(
        ["--output_dir", str(root / "trials"), "--num_sessions", "2", "--num_neurons", "12", "--num_trials", "20",
         "--num_steps", "60"]
    )
    train_tokenizer_command.run(
        ["--trials_dataset", str(root / "trials"), "--output_dir", str(root / "tokenizer"), "--preset", "tiny",
         "--max_steps", "4", "--per_device_train_batch_size", "32", "--report_to", "none", "--use_cpu",
         "--save_strategy", "no", "--disable_tqdm", "true"]
    )
    tokenize_command.run(
        ["--tokenizer_path", str(root / "tokenizer"), "--trials_dataset", str(root / "trials"),
         "--output_dir", str(root / "tokenized")]
    )
    return root


def pretrain_args(root: Path, output_dir: Path, extra: list[str] = ()) -> list[str]:
    return [
        "--tokenized_dataset", str(root / "tokenized"), "--tokenizer_path", str(root / "tokenizer"),
        "--output_dir", str(output_dir), "--preset", "tiny", "--max_neurons", "8",  # 12 neurons: subsampling is on
        "--max_steps", "6", "--save_steps", "3", "--save_strategy", "steps", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--seed", "7", "--report_to", "none", "--use_cpu", "--forecast_eval_trials", "0",
        "--disable_tqdm", "true", "--dataloader_num_workers", "0", *extra,
    ]


class Interrupted(RuntimeError):
    pass


class InterruptAfterThreeSteps(CalmTrainer):
    """Dies at the start of step 4, after checkpoint-3 was written: a crash mid-run."""

    def training_step(self, *args, **kwargs):
        if self.state.global_step >= 3:
            raise Interrupted("simulated crash")
        return super().training_step(*args, **kwargs)


@pytest.mark.slow
def test_resumed_pretraining_matches_uninterrupted(tokenized, tmp_path, monkeypatch):
    pretrain = pretrain_command
    pretrain.run(pretrain_args(tokenized, tmp_path / "straight"))

    monkeypatch.setattr(pretrain, "CalmTrainer", InterruptAfterThreeSteps)
    with pytest.raises(Interrupted):
        pretrain.run(pretrain_args(tokenized, tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    monkeypatch.setattr(pretrain, "CalmTrainer", CalmTrainer)
    pretrain.run(pretrain_args(tokenized, tmp_path / "resumed",
                                ["--resume_from_checkpoint", str(tmp_path / "resumed" / "checkpoint-3")]))

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # and training did move the weights (the comparison is not between two untouched initialisations)
    start = load_file(tmp_path / "resumed" / "checkpoint-3" / "model.safetensors")
    assert any(not torch.equal(start[n], resumed[n]) for n in start)


@pytest.mark.slow
def test_pretrain_runs_as_two_process_ddp(tokenized, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun is installed with torch"
    out = tmp_path / "ddp"
    args = pretrain_args(tokenized, out, ["--ddp_backend", "gloo"])
    args[args.index("--max_steps") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the package module, as training/pretrain_ddp.sh launches it (no file path into the checkout)
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "calm_hf.commands.pretrain", *args],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    assert "world size 2" in result.stderr  # two gloo processes, not one


def test_train_tokenizer_fits_the_codebook_warmup_into_a_short_run(tokenized):
    # the fixture ran 4 steps with the tiny preset's 10-step warm-up: without the fit the codebook was never seeded
    from calm_hf import CalmTokenizer, CalmTokenizerConfig

    tokenizer = CalmTokenizer.from_pretrained(tokenized / "tokenizer")
    assert tokenizer.config.codebook_warmup_steps == 1  # a quarter of 4 steps
    assert tokenizer.config.gumbel_anneal_steps == 3
    assert int(tokenizer.training_step) == 4 and not tokenizer.codebook_frozen()
    preset = CalmTokenizerConfig.from_preset("cpu")
    assert train_tokenizer_command.fit_schedule_to_run(preset, 31) == {"codebook_warmup_steps": 7,
                                                                       "gumbel_anneal_steps": 23}
    assert train_tokenizer_command.fit_schedule_to_run(preset, 782) == {"codebook_warmup_steps": 195,
                                                                        "gumbel_anneal_steps": 586}
    assert train_tokenizer_command.fit_schedule_to_run(preset, 10_000) == {}


def test_training_stopped_inside_the_warmup_seeds_the_codebook_and_warns(caplog, tmp_path):
    import logging

    from transformers import TrainingArguments, default_data_collator

    from calm_hf import CalmTokenizer, CalmTokenizerConfig

    torch.manual_seed(0)
    model = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny", codebook_warmup_steps=50))
    random_codebook = model.get_codebook()
    segments = train_tokenizer_command.segment_dataset(torch.randn(64, 16).numpy())
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=16, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    with caplog.at_level(logging.WARNING, logger="calm_hf.trainer"):
        CalmTrainer(model=model, args=args, train_dataset=segments, data_collator=default_data_collator).train()
    assert int(model.training_step) == 3 and model.codebook_frozen()
    assert not torch.allclose(model.get_codebook(), random_codebook)  # k-means on the queued encoder outputs
    assert "inside the 50-step codebook warm-up" in caplog.text


def test_pretrain_refuses_an_unknown_highway_init(tokenized, tmp_path):
    with pytest.raises(ValueError, match="--value_skip_init must be 'ridge' or 'random'"):
        pretrain_command.run(pretrain_args(tokenized, tmp_path / "bad", ["--value_skip_init", "zeros"]))
    assert not (tmp_path / "bad" / "model.safetensors").exists()
