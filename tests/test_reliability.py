"""No silent wrong answers, no obscure crashes, no stale or half-written state.

One test per class of defect, parametrised over the bad inputs that would give a silent result or an obscure
traceback; each asserts the clear error (type + words of the message) or the correct result. The stage machinery
of the main job and the atomic writes are tested here with fabricated folders (fast) and with SIGTERM in
subprocesses; the end-to-end stale-stage case lives in test_main_job.py.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from calm_hf import (
    CalmConfig,
    CalmForCausalNeuralModeling,
    CalmModel,
    CalmTokenizer,
    CalmTokenizerConfig,
)
from calm_hf.atomic import atomic_folder, atomic_write_text, partial_path, remove_stale_partials
from calm_hf.commands import stages
from calm_hf.cli import main as calm_main
from calm_hf.data import SessionTrials, causal_ema, check_traces, resample
from calm_hf.forecasting import check_tokenizer_matches_model

REPO = Path(__file__).resolve().parents[1]


def src_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = CalmConfig.from_preset(
        "tiny", vocab_size=tokenizer.config.codebook_size, window_size=tokenizer.config.window_size,
        num_neurons=16, num_sessions=2, tokenizer_fingerprint=tokenizer.fingerprint(),
    )
    return CalmForCausalNeuralModeling(config).eval()


# ---------------------------------------------------------------------------------------------------------------------
# numeric guards: encode, trace checks, filters
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "values, match",
    [
        (torch.full((1, 2, 8), 1e30), "non-finite states"),
        (torch.full((1, 2, 8), -1e35), "non-finite states"),
        (torch.full((1, 2, 8), 1e300, dtype=torch.float64), "beyond the range of torch.float32"),
        (torch.full((1, 2, 8), -1e39, dtype=torch.float64), "beyond the range"),
        (torch.ones(1, 2, 8, dtype=torch.complex64), "complex"),
        (torch.ones(1, 2, 8, dtype=torch.bool), "bool"),
    ],
    ids=["1e30", "-1e35", "float64-1e300", "float64-1e39", "complex", "bool"],
)
def test_encode_refuses_values_it_cannot_tokenize(tokenizer, values, match):
    # before: 1e30 gave all-zero codes, float64 beyond float32 became inf codes, complex dropped the imaginary part
    with pytest.raises(ValueError, match=match):
        tokenizer.encode(values)


def test_encode_accepts_integer_and_float64_traces_in_range(tokenizer):
    x = torch.randn(1, 2, 8, dtype=torch.float64)
    codes = tokenizer.encode(x).codes
    assert torch.equal(codes, tokenizer.encode(x.float()).codes)
    assert tokenizer.encode(torch.ones(1, 2, 8, dtype=torch.int64)).codes.shape == (1, 2, 2)


@pytest.mark.parametrize("value", [1e39, -3.5e38, 1e300])
def test_float64_beyond_float32_is_caught_when_cast(value):
    traces = np.zeros((2, 3, 10))
    traces[1, 2, 7] = value
    # before: the finiteness check ran on float64, the cast to float32 then gave inf silently
    with pytest.raises(ValueError, match="beyond the range of float32.*trial 1, neuron 2, frame 7"):
        SessionTrials(name="s", traces=traces, fs=5.0)
    with pytest.raises(ValueError, match="beyond the range"):
        check_traces(traces, dtype=np.float32)


def test_check_traces_refuses_complex():
    with pytest.raises(ValueError, match="complex"):
        check_traces(np.ones((2, 5), dtype=np.complex128))
    with pytest.raises(ValueError, match="complex"):
        SessionTrials(name="s", traces=np.ones((1, 2, 5), dtype=np.complex64), fs=5.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("filter_name", ["resample", "causal_ema"])
def test_filters_refuse_non_finite_instead_of_spreading_it(filter_name, bad):
    traces = np.ones((2, 30), dtype=np.float32)
    traces[1, 4] = bad
    call = (lambda x: resample(x, 10.0, 5.0)) if filter_name == "resample" else causal_ema
    # before: NaN spread over the rest of the trace (causal_ema) or the whole trace (resample) silently
    with pytest.raises(ValueError, match=r"NaN/Inf.*\(1, 4\)"):
        call(traces)
    with pytest.raises(ValueError, match="complex"):
        call(traces.astype(np.complex64))


# ---------------------------------------------------------------------------------------------------------------------
# generate / forward argument validation
# ---------------------------------------------------------------------------------------------------------------------

IDS = torch.randint(0, 16, (2, 3, 4), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "convert",
    [
        lambda ids: ids.to(torch.int16),  # what with_format("numpy") gives for the tokenized dataset
        lambda ids: ids.to(torch.int8),
        lambda ids: ids.to(torch.uint8),
        lambda ids: ids.to(torch.int32),
        lambda ids: ids.numpy().astype(np.int16),
        lambda ids: ids.numpy().astype(np.uint16),
        lambda ids: ids.tolist(),
    ],
    ids=["int16", "int8", "uint8", "int32", "numpy-int16", "numpy-uint16", "list"],
)
def test_generate_accepts_any_integer_ids(model, convert):
    expected = model.generate(input_ids=IDS, max_new_tokens=2)
    assert torch.equal(model.generate(input_ids=convert(IDS), max_new_tokens=2), expected)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(input_ids=IDS.float()), TypeError, "must hold integers, got dtype torch.float32"),
        (dict(input_ids=IDS > 3), TypeError, "must hold integers, got dtype torch.bool"),
        (dict(input_ids=IDS.to(torch.complex64)), TypeError, "complex"),
        (dict(input_ids=IDS.numpy().astype(np.float64)), TypeError, "float64"),
        (dict(input_ids=[[[1, 2], [3]]]), TypeError, "nested list"),
        (dict(input_ids=IDS[:, :0]), ValueError, "is empty"),
        (dict(input_ids=IDS[:0]), ValueError, "is empty"),
        (dict(input_ids=IDS[:, :, :0]), ValueError, "is empty"),
        (dict(input_ids=IDS, num_return_sequences=0), ValueError, "num_return_sequences"),
        (dict(input_ids=IDS, num_return_sequences=-1), ValueError, "num_return_sequences"),
        (dict(input_ids=IDS, num_return_sequences=2.5), ValueError, "num_return_sequences"),
        (dict(input_ids=IDS, do_sample=True, top_p=2.0), ValueError, "top_p"),
        (dict(input_ids=IDS, do_sample=True, top_p=0.0), ValueError, "top_p"),
        (dict(input_ids=IDS, do_sample=True, top_p=float("nan")), ValueError, "top_p"),
        (dict(input_ids=IDS, do_sample=True, top_k=-1), ValueError, "top_k"),
        (dict(input_ids=IDS, do_sample=True, temperature=0.0), ValueError, "temperature"),
        (dict(input_ids=IDS, do_sample=True, temperature=float("inf")), ValueError, "temperature"),
        (dict(input_ids=IDS, max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(input_ids=IDS, max_new_tokens=2.5), ValueError, "max_new_tokens"),
        (dict(input_ids=IDS + 100), ValueError, "vocab_size"),
        (dict(input_ids=IDS, neuron_ids=torch.zeros(2, 3)), TypeError, "neuron_ids must hold integers"),
        (dict(input_ids=IDS, session_ids=[0.5, 1.0]), TypeError, "session_ids must hold integers"),
    ],
    ids=["float", "bool", "complex", "numpy-float", "ragged", "0-neurons", "0-batch", "0-steps", "nrs-0", "nrs-neg",
         "nrs-frac", "top_p-2", "top_p-0", "top_p-nan", "top_k-neg", "temperature-0", "temperature-inf", "mnt-0",
         "mnt-frac", "oov", "float-neuron-ids", "float-session-ids"],
)
def test_generate_refuses_bad_arguments_clearly(model, kwargs, error, match):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=match):
        model.generate(**kwargs)


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.full_like(IDS, 99), "outside \\[0, 16\\)"),
        (torch.full_like(IDS, -5), "outside"),
        (torch.full_like(IDS, -100), "Every label is -100"),
        (IDS[:, :, :1], None),  # one step: nothing to predict after the shift
    ],
    ids=["oov", "negative", "all-ignored", "one-step"],
)
def test_labels_out_of_vocabulary_or_all_ignored_is_a_clear_error(model, labels, match):
    # the label checks run where batches enter (validate_inputs: collator, CalmTrainer), not in every forward
    if match is None:
        with pytest.raises(ValueError, match="Every label is -100"):
            model.validate_inputs(input_ids=IDS[:, :, :1], labels=labels)
        return
    with pytest.raises(ValueError, match=match):  # before: IndexError "Target 99 is out of bounds" / NaN loss
        model.validate_inputs(input_ids=IDS, labels=labels)


def test_partially_ignored_labels_still_give_a_finite_loss(model):
    labels = IDS.clone()
    labels[0] = -100
    assert torch.isfinite(model(input_ids=IDS, labels=labels).loss)


# ---------------------------------------------------------------------------------------------------------------------
# eager attention memory guard
# ---------------------------------------------------------------------------------------------------------------------

def test_eager_attention_chunks_under_the_memory_bound_and_refuses_beyond(monkeypatch):
    torch.manual_seed(0)
    config = CalmConfig.from_preset("tiny", vocab_size=16, num_neurons=300, num_sessions=1, attn_implementation="eager",
                                    neuron_attention_block=None)  # attention over all 300 neurons
    eager = CalmForCausalNeuralModeling(config).eval()
    ids = torch.randint(0, 16, (2, 300, 6))
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 250:] = False
    with torch.no_grad():
        whole = eager(input_ids=ids, neuron_mask=mask).logits
        # 300 neurons x 2 heads x 300 x 12 bytes = 2.2 MB per sequence: 5 MB forces chunks of 2 of the 12 sequences
        monkeypatch.setenv("CALM_EAGER_ATTENTION_MAX_GIB", str(5e6 / 2**30))
        chunked = eager(input_ids=ids, neuron_mask=mask).logits
    assert torch.allclose(whole, chunked, atol=1e-6)
    monkeypatch.setenv("CALM_EAGER_ATTENTION_MAX_GIB", str(1e6 / 2**30))
    with pytest.raises(ValueError, match=r"300 neurons needs ~\d+\.\d MiB.*\(2\.1 MiB per sequence.*attn_implementation='sdpa'"):
        eager(input_ids=ids)


def test_eager_guard_estimate_matches_the_issue_scale():
    from calm_hf.modeling_calm import eager_attention_bytes

    # 20k neurons, 8 heads, one sequence: ~38 GB of float32 score matrices, far above the default 4 GiB
    assert eager_attention_bytes(1, 8, 20_000, 20_000) / 2**30 > 30


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint integrity and the tokenizer fingerprint
# ---------------------------------------------------------------------------------------------------------------------

def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"not a safetensors file" * 8)
    elif how == "header-only":
        path.write_bytes(data[:5])
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("checksums", [True, False], ids=["with-checksums", "without-checksums"])
@pytest.mark.parametrize("how", ["truncated", "garbage", "header-only", "empty"])
@pytest.mark.parametrize("which", ["model", "tokenizer"])
def test_corrupt_safetensors_is_an_error_naming_the_file(tmp_path, model, tokenizer, which, how, checksums):
    folder = tmp_path / which
    (model if which == "model" else tokenizer).save_pretrained(folder)
    corrupt(folder / "model.safetensors", how)
    if not checksums:  # a checkpoint saved before checksums existed: the safetensors parser's error is rewrapped
        (folder / "checksums.sha256").unlink()
    cls = CalmForCausalNeuralModeling if which == "model" else CalmTokenizer
    with pytest.raises((ValueError, OSError), match=str(folder / "model.safetensors").replace(".", r"\.")):
        cls.from_pretrained(folder)


@pytest.mark.parametrize("which", ["model", "tokenizer"])
def test_bit_flipped_weights_are_refused(tmp_path, model, tokenizer, which):
    folder = tmp_path / which
    (model if which == "model" else tokenizer).save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor: the file still parses and loads
    weights.write_bytes(bytes(data))
    cls = CalmForCausalNeuralModeling if which == "model" else CalmTokenizer
    with pytest.raises(ValueError, match="does not match the sha256 recorded"):  # before: loaded and generated
        cls.from_pretrained(folder)
    line = (folder / "checksums.sha256").read_text().split()
    assert line[1] == "model.safetensors" and len(line[0]) == 64  # `sha256sum -c` format


def test_missing_tokenizer_subfolder_is_a_file_not_found_error(tmp_path, model):
    model.save_pretrained(tmp_path / "calm-base")
    for call in (lambda: CalmTokenizer.from_pretrained(tmp_path / "calm-base" / "tokenizer"),
                 lambda: CalmTokenizer.from_pretrained(str(tmp_path / "calm-base"), subfolder="tokenizer")):
        # before: "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
        with pytest.raises(FileNotFoundError, match="tokenizer/` subfolder"):
            call()
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):
        CalmForCausalNeuralModeling.from_pretrained(tmp_path / "no-such-run")


@pytest.mark.parametrize("delta", [+1, -1])
@pytest.mark.parametrize("cls", [CalmForCausalNeuralModeling, CalmModel])
def test_config_weights_layer_mismatch_is_an_error(tmp_path, model, cls, delta):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] += delta
    (tmp_path / "config.json").write_text(json.dumps(config))
    # before: a warning, and randomly initialised (or dropped) layers
    with pytest.raises(ValueError, match="does not match its weights"):
        cls.from_pretrained(tmp_path)


def test_tokenizer_layer_mismatch_is_an_error(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_decoder_layers"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="decoder.layers"):
        CalmTokenizer.from_pretrained(tmp_path)


def test_intact_checkpoints_still_load_with_loading_info(tmp_path, model):
    model.save_pretrained(tmp_path)
    loaded, info = CalmForCausalNeuralModeling.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert isinstance(CalmModel.from_pretrained(tmp_path), CalmModel)  # the head's weights are not an error


def test_both_model_files_load_through_the_one_checked_loader():
    from calm_hf import checked_loading, modeling_calm, modeling_calm_tokenizer

    for module in (modeling_calm, modeling_calm_tokenizer):
        assert module.load_checked_pretrained is checked_loading.load_checked_pretrained
        assert module.write_weight_checksums is checked_loading.write_weight_checksums


def test_tokenizer_fingerprint_refuses_another_runs_tokenizer(tmp_path, model, tokenizer):
    torch.manual_seed(1)
    other = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")).eval()
    assert other.config.codebook_size == model.config.vocab_size  # same size: the old check let it through
    with pytest.raises(ValueError, match=f"fingerprint {other.fingerprint()}.*fingerprint {tokenizer.fingerprint()}"):
        check_tokenizer_matches_model(model, other)
    check_tokenizer_matches_model(model, tokenizer)
    # stable across save/load and a bf16 load
    tokenizer.save_pretrained(tmp_path / "tok")
    model.save_pretrained(tmp_path / "model")
    reloaded = CalmForCausalNeuralModeling.from_pretrained(tmp_path / "model")
    check_tokenizer_matches_model(reloaded, CalmTokenizer.from_pretrained(tmp_path / "tok"))
    check_tokenizer_matches_model(reloaded, CalmTokenizer.from_pretrained(tmp_path / "tok", dtype=torch.bfloat16))
    # a checkpoint from before fingerprints (None) is not refused
    legacy = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", vocab_size=model.config.vocab_size))
    check_tokenizer_matches_model(legacy, other)


# ---------------------------------------------------------------------------------------------------------------------
# CLI exit codes
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "argv, code",
    [
        (["push", "/no/such/calm-base", "someone/calm-base"], 1),
        (["forecast", "--model", "/no/such/model", "--traces", "/no/such.npy", "--horizon", "3"], 1),
        (["tokenize", "--tokenizer_path", "/no/such/tok", "--trials_dataset", "/no/such/trials", "--output_dir",
          "/tmp/calm-test-never-written"], 1),
        (["no-such-command"], 2),
        (["forecast", "--horizon", "x"], 2),
        (["--help"], 0),
    ],
    ids=["push-missing-folder", "forecast-missing-file", "tokenize-missing-tokenizer", "unknown-command",
         "bad-flag", "help"],
)
def test_cli_returns_non_zero_on_every_failure(argv, code, capsys):
    assert calm_main(argv) == code  # before: push returned None (exit 0) on every failure
    if code == 1:
        assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["truncated-npz", "garbage-npz", "truncated-npy", "npz-without-traces",
                                  "npz-renamed-npy-without-traces"])
def test_calm_forecast_names_a_corrupt_trace_file(tmp_path, model, kind, capsys):
    model.save_pretrained(tmp_path / "calm-base")
    archive = tmp_path / "ok.npz"
    np.savez(archive, traces=np.zeros((3, 40), dtype=np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((3, 40), dtype=np.float32))
    path = tmp_path / ("bad.npz" if "npz" in kind and "renamed" not in kind else "bad.npy")
    if kind == "truncated-npz":
        path.write_bytes(archive.read_bytes()[:100])
    elif kind == "garbage-npz":
        path.write_bytes(b"PK\x03\x04" + b"x" * 50)
    elif kind == "truncated-npy":
        path.write_bytes((tmp_path / "ok.npy").read_bytes()[:-40])
    else:
        np.savez(tmp_path / "other.npz", x=np.zeros(3))
        path.write_bytes((tmp_path / "other.npz").read_bytes())
    # before: BadZipFile / EOFError / an NpzFile passed on as traces, without the path
    assert calm_main(["forecast", "--model", str(tmp_path / "calm-base"), "--traces", str(path), "--horizon", "4"]) == 1
    assert str(path) in capsys.readouterr().err


@pytest.mark.slow
def test_calm_push_failure_exits_non_zero_in_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, "-m", "calm_hf.cli", "push", str(tmp_path / "missing"), "a/b"],
                            capture_output=True, text=True, env=src_env(), timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "does not exist" in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# stage machinery of the main job (fabricated folders) and atomic writes
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_all_stages():
    return stages


def fake_checkpoint(folder: Path, state: bool = True, weights: str = "ok", optimizer: bool = True) -> Path:
    folder.mkdir(parents=True)
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[-1])}))
    if weights != "none":
        save_file({"w": torch.ones(64)}, str(folder / "model.safetensors"))
        if weights == "truncated":
            corrupt(folder / "model.safetensors", "truncated")
    if optimizer:
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
        torch.save({"last_epoch": 1}, folder / "scheduler.pt")
    return folder


def test_resume_only_from_complete_checkpoints(tmp_path, run_all_stages, caplog):
    stage = run_all_stages.Stage(tmp_path / "pretrain", {"argv": ["--seed", "0"]})
    good = fake_checkpoint(stage.path / "checkpoint-2")
    fake_checkpoint(stage.path / "checkpoint-4", optimizer=False)
    fake_checkpoint(stage.path / "checkpoint-6", weights="truncated")
    fake_checkpoint(stage.path / "checkpoint-8", state=False)
    with caplog.at_level("WARNING"):
        # before: checkpoint-8 (no trainer_state.json) was resumed from and every re-run failed until --fresh
        assert stage.last_checkpoint() == str(good)
    assert "no trainer_state.json" in caplog.text and "unreadable model.safetensors" in caplog.text
    assert sorted(p.name for p in stage.path.iterdir()) == ["checkpoint-2"]


def test_changed_parameters_never_resume_the_old_runs_checkpoints(tmp_path, run_all_stages):
    old = run_all_stages.Stage(tmp_path / "pretrain", {"argv": ["--seed", "0"]})
    old.start()
    fake_checkpoint(old.path / "checkpoint-7")
    old.finish(1.0)
    new = run_all_stages.Stage(tmp_path / "pretrain", {"argv": ["--seed", "1"]})
    assert old.done() and not new.done()
    new.start()  # before: the seed-1 run resumed seed-0's finished checkpoint-7 and trained 0 steps
    assert new.last_checkpoint() is None and not old.done()
    # an interrupted run of the *same* parameters keeps its checkpoints
    fake_checkpoint(new.path / "checkpoint-3")
    again = run_all_stages.Stage(tmp_path / "pretrain", {"argv": ["--seed", "1"]})
    again.start()
    assert again.last_checkpoint() == str(new.path / "checkpoint-3")


@pytest.mark.parametrize("content", ['{"key": "abc", "sec', "", "\x00\x01", "[1, 2]"])
def test_truncated_stage_marker_means_not_done(tmp_path, run_all_stages, content):
    stage = run_all_stages.Stage(tmp_path / "trials", {"argv": []})
    stage.path.mkdir()
    stage.marker.write_text(content)
    assert not stage.done()  # before: JSONDecodeError on every run
    assert stage.seconds() == 0.0


def test_stage_markers_are_written_atomically(tmp_path, run_all_stages):
    stage = run_all_stages.Stage(tmp_path / "tokenizer", {"argv": []})
    stage.start()
    stage.finish(2.5, metrics={"loss": 1.0})
    assert stage.done() and stage.seconds() == 2.5
    assert not list(stage.path.glob("*.partial"))
    atomic = run_all_stages.Stage(tmp_path / "trials", {"argv": []}, atomic=True)
    atomic.start()
    atomic.output.mkdir()
    (atomic.output / "data.txt").write_text("new")
    atomic.finish(1.0)
    assert (atomic.path / "data.txt").read_text() == "new" and atomic.done() and not atomic.output.exists()


def test_stale_partials_are_removed(tmp_path):
    (tmp_path / "trials.partial" / "train").mkdir(parents=True)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / ".calm_stage.json.partial").write_text("{")
    (tmp_path / "keep").mkdir()
    removed = remove_stale_partials(tmp_path)
    assert sorted(p.name for p in removed) == [".calm_stage.json.partial", "trials.partial"]
    assert (tmp_path / "keep").is_dir() and (tmp_path / "tokenizer").is_dir()


def test_atomic_folder_keeps_the_old_version_when_writing_fails(tmp_path):
    target = tmp_path / "out"
    atomic_folder(target, lambda staging: (staging.mkdir(), (staging / "v").write_text("1")))

    def failing(staging):
        staging.mkdir()
        (staging / "v").write_text("2")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_folder(target, failing)
    assert (target / "v").read_text() == "1" and not partial_path(target).exists()
    atomic_write_text(tmp_path / "f.json", "{}")
    assert (tmp_path / "f.json").read_text() == "{}" and not partial_path(tmp_path / "f.json").exists()


KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from datasets import Dataset, DatasetDict
    import calm_hf.data.datasets as ds

    out = sys.argv[1]
    def corpus(value):
        return DatasetDict({"train": Dataset.from_dict({"x": [value] * 4})})
    ds.save_trial_dataset(corpus(1), out, sessions=[])
    real = ds.save_session_metadata
    def slow(path, sessions):  # the splits are written; metadata pending: the window where a kill hurts
        print("SPLITS WRITTEN", flush=True)
        time.sleep(60)
        return real(path, sessions)
    ds.save_session_metadata = slow
    ds.save_trial_dataset(corpus(2), out, sessions=[])
    """
)


@pytest.mark.slow
def test_sigterm_while_saving_a_dataset_leaves_the_old_one_whole(tmp_path):
    out = tmp_path / "trials"
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(out)], stdout=subprocess.PIPE, text=True,
                               env=src_env())
    try:
        assert process.stdout.readline().strip() == "SPLITS WRITTEN"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode != 0
    from datasets import load_from_disk

    # before: the new splits sat beside the old calm_sessions.json; now the old version is intact and complete
    assert load_from_disk(str(out))["train"]["x"] == [1] * 4
    assert json.loads((out / "calm_sessions.json").read_text()) == {"calm_sessions": []}
    assert partial_path(out).exists()  # killed hard: the stale staging folder is left ...
    remove_stale_partials(tmp_path, max_depth=1)  # ... and removed by the next run
    assert not partial_path(out).exists()


@pytest.mark.slow
def test_main_job_killed_with_sigterm_resumes_cleanly(tmp_path):
    """SIGTERM during tokenizer training: the job exits non-zero without a staging folder; the re-run finishes and
    its release is complete (about 30 s: two tiny runs)."""
    command = [sys.executable, "-m", "calm_hf.cli", "main", "--size", "tiny", "--output_dir", str(tmp_path),
               "--bf16", "false"]
    log = tmp_path / "first.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=src_env())
        deadline = time.time() + 120
        while "[train_tokenizer] running" not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        assert process.poll() is None, "the job ended before it could be signalled:\n" + log.read_text()[-2000:]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    assert process.returncode != 0, log.read_text()[-2000:]
    work = tmp_path / ".calm-base-work"
    assert not list(work.glob("*.partial")) and not (tmp_path / "calm-base").exists()
    (work / "tokenized.partial").mkdir()  # as a SIGKILL would leave it
    result = subprocess.run(command, capture_output=True, text=True, env=src_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[corpus] reusing" in result.stderr
    assert not list(work.glob("*.partial")) and not list(tmp_path.glob("*.partial"))
    assert (tmp_path / "calm-base" / "run_summary.json").is_file()


def test_a_sigterm_whose_exception_was_swallowed_still_stops_the_job():
    """A library that catches everything (or a `__del__` the signal lands in) must not turn SIGTERM into success: the
    next stage boundary and the end of the job raise again."""
    from calm_hf.commands.stages import _Terminated, raise_if_terminated, terminate_cleanly

    with pytest.raises(_Terminated) as caught:
        with terminate_cleanly():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)
            except BaseException:
                pass
    assert caught.value.code == 128 + signal.SIGTERM
    raise_if_terminated()  # the flag does not outlive the job


def test_default_threads_use_the_free_cores(monkeypatch):
    """Idle machine: every core (2 threads = 1.88x on an idle 2-core box); busy machine: the free ones, at least 1."""
    from calm_hf import hardware

    for name in ("CALM_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(hardware, "busy_cores_now", lambda: None)  # no /proc/stat: the load average decides
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert hardware.default_num_threads() == 2
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (1.0, 0.0, 0.0))
    assert hardware.default_num_threads() == 1
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (5.0, 0.0, 0.0))
    assert hardware.default_num_threads() == 1
    monkeypatch.setattr(hardware, "busy_cores_now", lambda: 0.1)  # measured now: a job that just ended is not counted
    assert hardware.default_num_threads() == 2
    monkeypatch.setattr(hardware, "busy_cores_now", lambda: 0.9)
    assert hardware.default_num_threads() == 1
    monkeypatch.setenv("CALM_NUM_THREADS", "3")
    assert hardware.default_num_threads() == 3


KEPT_MEMORY_SCRIPT = """
import os
from calm_hf.hardware import keep_freed_memory
applied = keep_freed_memory()
import torch

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = resident()
block = torch.ones(64 << 18)  # 64 MiB, every page written
del block
print(applied, (resident() - before) / 2**20)
"""


@pytest.mark.skipif(sys.platform != "linux" or __import__("platform").libc_ver()[0] != "glibc",
                    reason="keep_freed_memory sets glibc's allocator; a no-op elsewhere")
def test_keep_freed_memory_keeps_a_freed_large_tensor_for_reuse_and_can_be_turned_off():
    """With the setting the commands apply, a freed 64 MiB tensor stays in the process for the next tensor (no fresh
    mapping, page faults and zeroing); with CALM_KEEP_FREED_MEMORY=0 glibc's default unmaps it."""
    results = {}
    for setting in ("1", "0"):
        env = {**os.environ, "CALM_KEEP_FREED_MEMORY": setting, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", KEPT_MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                             timeout=120, check=True).stdout.split()
        results[setting] = (out[-2] == "True", float(out[-1]))
    assert results["1"][0] and results["1"][1] > 48, results
    assert not results["0"][0] and results["0"][1] < 16, results


def test_busy_cores_are_read_from_proc_stat(monkeypatch, tmp_path):
    from calm_hf import hardware

    samples = iter([
        "cpu  10 0 10 80 0 0 0 0\ncpu0 0 0 0 100 0 0 0 0\ncpu1 0 0 0 100 0 0 0 0\nintr 1\n",
        # cpu0 busy for all 100 ticks (user + system), cpu1 idle, cpu2 is not ours
        "cpu  10 0 10 80 0 0 0 0\ncpu0 60 0 40 100 0 0 0 0\ncpu1 0 0 0 200 0 0 0 0\ncpu2 99 0 0 0 0 0 0 0\n",
    ])

    def fake_times(path="/proc/stat"):
        stat = tmp_path / "stat"
        stat.write_text(next(samples))
        return real_times(str(stat))

    real_times = hardware._cpu_times
    monkeypatch.setattr(hardware, "_cpu_times", fake_times)
    monkeypatch.setattr(hardware.os.path, "exists", lambda path: True)
    assert hardware.busy_cores_now({0, 1}, interval=0.0) == pytest.approx(1.0)


def test_training_on_a_dataset_tokenized_by_another_tokenizer_is_refused(tmp_path):
    """`calm tokenize` records its tokenizer's fingerprint beside the dataset; pretraining with another tokenizer (same
    codebook size, so nothing else would notice) is refused with both named."""
    from calm_hf import CalmTokenizer, CalmTokenizerConfig
    from calm_hf.commands import prepare, pretrain, tokenize

    prepare.run(["--output_dir", str(tmp_path / "trials"), "--num_sessions", "1", "--num_neurons", "6",
                 "--num_trials", "12", "--num_steps", "40"])
    for seed, name in ((0, "tok-a"), (1, "tok-b")):
        torch.manual_seed(seed)
        CalmTokenizer(CalmTokenizerConfig.from_preset("tiny", codebook_size=16)).save_pretrained(tmp_path / name)
    tokenize.run(["--tokenizer_path", str(tmp_path / "tok-a"), "--trials_dataset", str(tmp_path / "trials"),
                  "--output_dir", str(tmp_path / "tokens")])
    assert json.loads((tmp_path / "tokens" / "calm_tokenizer.json").read_text())["fingerprint"] == (
        CalmTokenizer.from_pretrained(tmp_path / "tok-a").fingerprint())
    with pytest.raises(ValueError, match="was tokenized by the tokenizer at .*tok-a"):
        pretrain.run(["--tokenized_dataset", str(tmp_path / "tokens"), "--tokenizer_path", str(tmp_path / "tok-b"),
                      "--output_dir", str(tmp_path / "calm"), "--preset", "tiny", "--max_steps", "1",
                      "--report_to", "none", "--use_cpu"])
