"""Nothing leaked: overlapping trials are split in time blocks, and `--bf16 auto` decides the same way every time.

A random split of windows that overlap in time puts the same frames into training and test trials; a bf16 decision
that flips with timing noise makes two identical runs train differently.
"""

import json

import numpy as np
import pytest

from calm_hf import hardware
from calm_hf.cli import main as calm_main
from calm_hf.commands import main as main_command
from calm_hf.commands import prepare as prepare_command
from calm_hf.data import split_trials_by_time
from recording_files import smooth_traces


@pytest.fixture
def continuous(tmp_path):
    path = tmp_path / "rec.npz"
    np.savez(path, traces=smooth_traces(4, 1200), fs=np.float32(10.0))  # 120 s
    return path


def prepared_sessions(tmp_path, continuous, *flags):
    out = tmp_path / "out"
    prepare_command.run(["--output_dir", str(out), "--npz", str(continuous), "--overwrite", *flags])
    return json.loads((out / "calm_sessions.json").read_text())["calm_sessions"][0]


def frames_of(session, split, length, stride):
    return {frame for trial in session["splits"][split] for frame in range(trial * stride, trial * stride + length)}


@pytest.mark.parametrize("stride", ["0", "-2", "nan", "0.01"])
def test_a_stride_that_is_not_a_positive_duration_is_refused(tmp_path, continuous, capsys, stride):
    # before: stride 0 became one frame (max(1, 0)): 1,101 trials each shifted by a frame, then split at random
    argv = ["prepare", "--output_dir", str(tmp_path / "out"), "--npz", str(continuous), "--trial_seconds", "10",
            "--trial_stride_seconds", stride]
    assert calm_main(argv) == 1
    assert "--trial_stride_seconds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_overlapping_trials_are_split_in_time_blocks_that_share_no_frame(tmp_path, continuous):
    session = prepared_sessions(tmp_path, continuous, "--trial_seconds", "10", "--trial_stride_seconds", "2.5")
    length, stride = 100, 25
    method = session["split_method"]
    assert method["method"] == "time_blocks" and method["gap_frames"] == length and method["unused_trials"] > 0
    train, validation, test = (frames_of(session, split, length, stride) for split in ("train", "validation", "test"))
    # before: a random split, so test trials shared frames with training trials
    assert not train & validation and not train & test and not validation & test
    assert min(validation) - max(train) > length and min(test) - max(validation) > length  # a trial length apart
    assert all(len(session["splits"][split]) for split in ("train", "validation", "test"))


def test_trials_that_do_not_overlap_keep_the_random_split(tmp_path, continuous):
    session = prepared_sessions(tmp_path, continuous, "--trial_seconds", "10")
    assert session["split_method"] == {"method": "random_trials", "seed": 0}
    assert sorted(i for split in session["splits"].values() for i in split) == list(range(12))


def test_time_blocks_keep_a_trial_length_between_splits_for_any_spacing():
    for count, stride, length in [(95, 20, 100), (20, 50, 100), (60, 99, 100), (300, 7, 40)]:
        starts = np.arange(count)[::-1] * stride  # any order
        splits, unused = split_trials_by_time(starts, length)
        train, validation, test = (starts[splits[name]] for name in ("train", "validation", "test"))
        assert train.max() + 2 * length <= validation.min() and validation.max() + 2 * length <= test.min()
        assert unused == count - sum(len(v) for v in splits.values())
    with pytest.raises(ValueError, match="too few to split into train, validation and test blocks"):
        split_trials_by_time(np.arange(5) * 50, 100)


# ---------------------------------------------------------------------------------------------------------------------
# bf16 auto
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "measured, expected",
    [
        ({"fp32_seconds": 1.3, "bf16_seconds": 1.0, "speedup": 1.3, "round_speedups": [1.25, 1.3, 1.4]}, True),
        ({"fp32_seconds": 1.19, "bf16_seconds": 1.0, "speedup": 1.19, "round_speedups": [1.2, 1.19, 1.18]}, False),
        ({"fp32_seconds": 1.3, "bf16_seconds": 1.0, "speedup": 1.3, "round_speedups": [1.5, 1.3, 0.9]}, False),
        ({"fp32_seconds": 0.25, "bf16_seconds": 0.41, "speedup": 0.61}, False),
    ],
    ids=["clearly-faster", "below-the-margin", "one-round-slower", "slower"],
)
def test_bf16_needs_a_clear_and_consistent_speedup(measured, expected):
    assert hardware.decide_bf16(measured) is expected


def test_bf16_timing_runs_interleaved_rounds():
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            return type("Out", (), {"loss": self.linear(x).pow(2).mean()})()

    measured = hardware.bf16_training_speedup(Tiny, {"x": torch.randn(4, 8)}, repeats=2, rounds=3)
    assert len(measured["round_speedups"]) == 3
    assert measured["speedup"] == pytest.approx(measured["fp32_seconds"] / measured["bf16_seconds"])


def test_a_bf16_decision_is_recorded_and_reused_on_this_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path / "cache"))
    timings = iter([1.3, 1.1])  # the second timing, alone, would decide otherwise
    calls = []

    def workload():
        calls.append(1)
        speedup = next(timings)
        return {"fp32_seconds": speedup, "bf16_seconds": 1.0, "speedup": speedup, "round_speedups": [speedup] * 3}

    first = hardware.bf16_decision("auto", "cpu", workload, name="pretraining", record_key={"recipe": {"batch": 4}})
    again = hardware.bf16_decision("auto", "cpu", workload, name="pretraining", record_key={"recipe": {"batch": 4}})
    assert first["bf16"] is again["bf16"] is True and len(calls) == 1
    assert "speedup 1.30" in first["reason"] and "reused from this machine's record" in again["reason"]
    other = hardware.bf16_decision("auto", "cpu", workload, name="pretraining", record_key={"recipe": {"batch": 8}})
    assert other["bf16"] is False and len(calls) == 2  # another recipe is measured afresh


def test_two_identical_jobs_decide_bf16_alike_and_say_why(monkeypatch, tmp_path, capsys):
    # before: two identical commands chose bf16 on and off for the tokenizer (forecast r 0.2050 vs 0.2165)
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(main_command, "accelerator_available", lambda: False)
    noisy = iter([1.25, 1.15, 1.15, 1.25])

    def measure(recipe):
        speedup = next(noisy)
        return {"fp32_seconds": speedup, "bf16_seconds": 1.0, "speedup": speedup, "round_speedups": [speedup]}

    monkeypatch.setattr(main_command, "tokenizer_step_speedup", measure)
    monkeypatch.setattr(main_command, "pretrain_step_speedup", measure)
    args = main_command.MainArguments(output_dir=str(tmp_path))
    recipe = main_command.resolve_recipe(args)
    decisions = []
    for folder in ("first", "second"):  # fresh work folders, e.g. after --fresh
        (tmp_path / folder).mkdir()
        decisions.append(main_command.choose_dtypes(args, recipe, tmp_path / folder))
    assert [(d["tokenizer_bf16"], d["pretrain_bf16"]) for d in decisions] == [(True, False)] * 2
    printed = capsys.readouterr().out
    assert "bf16 autocast for tokenizer: on (auto: a training step took" in printed and "reused" in printed
    assert set(decisions[1]["reasons"]) == {"tokenizer", "pretraining"}
