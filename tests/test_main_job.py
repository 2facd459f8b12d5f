"""The main job end to end (tiny sizes, seconds): every file of calm-base/, the card's numbers, the user's everyday
calls from that folder, remote-code loading without calm_hf, hub push and load back, and stage reuse."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

import calm_hf
from calm_hf.commands import main as main_command

BLOCK_CALM_HF = 'import sys; sys.modules["calm_hf"] = None  # a Python without calm_hf\n'


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("main-job")
    summary = main_command.run(["--size", "tiny", "--output_dir", str(out), "--bf16", "false"])
    return out, summary


@pytest.mark.slow
def test_main_job_writes_every_file(release):
    out, summary = release
    model_dir = out / "calm-base"
    for name in ("config.json", "model.safetensors", "generation_config.json", "modeling_calm.py",
                 "configuration_calm.py", "README.md", "forecast_example.png", "eval_results.json",
                 "run_summary.json", "tokenizer/config.json", "tokenizer/model.safetensors",
                 "tokenizer/modeling_calm_tokenizer.py", "tokenizer/configuration_calm_tokenizer.py",
                 "tokenizer/README.md"):
        assert (model_dir / name).is_file(), name
    corpus = json.loads((out / "calm-base-dataset" / "corpus.json").read_text())
    for shard in corpus["shards"]:  # the tokenized corpus it was pretrained on, shard by shard
        assert (out / "calm-base-dataset" / shard["path"] / "dataset_dict.json").is_file()
    assert (out / "calm-base-dataset" / "README.md").is_file()
    assert (model_dir / "forecast_example.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_calm.CalmModel"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_calm.CalmForCausalNeuralModeling"
    # neuron-axis attention groups are as wide as a pretraining example
    recipe = json.loads((Path(calm_hf.__file__).parent / "recipes" / "main_tiny.json").read_text())
    assert config["neuron_attention_block"] == recipe["max_neurons"]
    assert config["context_token_steps"] == recipe["context_token_steps"]  # the context length forecasts read
    tokenizer_map = json.loads((model_dir / "tokenizer" / "config.json").read_text())["auto_map"]
    assert all(isinstance(v, str) for v in tokenizer_map.values())  # not the list form of text tokenizers
    assert set(summary["timings"]) >= {"corpus", "train_tokenizer", "tokenize", "pretrain", "evaluate_and_write"}


@pytest.mark.slow
def test_model_card_carries_the_runs_numbers(release):
    out, summary = release
    card = ModelCard.load(out / "calm-base" / "README.md")
    results = card.data.to_dict()["model-index"][0]["results"]
    values = {m["type"] if "type" in m else m["name"]: m["value"] for r in results for m in r["metrics"]}
    written = json.loads((out / "calm-base" / "eval_results.json").read_text())
    r = written["sim_in_k0_calm_pearson_r"]  # zero-shot on held-out sessions of the training simulator
    assert any(abs(v - r) < 1e-6 for v in values.values()), (values, r)
    assert f"{r:.3f}" in card.text or f"{r:.4f}" in card.text
    assert "forecast_example.png" in card.text
    assert card.data.license == "apache-2.0"
    for name, cells in written["heldout"].items():  # every shortfall against a baseline is said in plain words
        for k, models in cells.items():
            baselines = {m: v for m, v in models.items() if m != "calm" and np.isfinite(v["pearson_r"])}
            if baselines and models["calm"]["pearson_r"] < max(v["pearson_r"] for v in baselines.values()):
                assert f"{name}, k = {k}: CalM's forecast r" in card.text and "BELOW" in card.text


@pytest.mark.slow
def test_model_card_states_the_bf16_decision(release):
    out, summary = release
    card = (out / "calm-base" / "README.md").read_text()
    assert "| bf16_autocast.tokenizer | off (--bf16 false) |" in card
    assert "| bf16_autocast.pretraining | off (--bf16 false) |" in card


@pytest.mark.slow
def test_rerun_reuses_finished_stages(release):
    out, _ = release
    # staging folders as a killed (SIGKILL) run leaves them: never read, removed by the next run
    stale = [out / ".calm-base-work" / "tokenized.partial", out / "calm-base.partial",
             out / ".calm-base-work" / "pretrain" / ".calm_stage.json.partial"]
    for path in stale[:2]:
        (path / "train").mkdir(parents=True)
    stale[2].write_text('{"key": ')
    summary = main_command.run(["--size", "tiny", "--output_dir", str(out), "--bf16", "false"])
    for stage in ("corpus", "train_tokenizer", "tokenize", "pretrain"):
        assert summary["timings"][stage]["reused"], stage
    assert not any(path.exists() for path in stale)


@pytest.mark.slow
def test_release_records_its_tokenizers_fingerprint(release):
    from calm_hf import CalmTokenizer

    out, _ = release
    config = json.loads((out / "calm-base" / "config.json").read_text())
    assert config["tokenizer_fingerprint"] == CalmTokenizer.from_pretrained(out / "calm-base" / "tokenizer").fingerprint()


@pytest.mark.slow
def test_changed_seed_in_the_same_folder_retrains_instead_of_reusing_checkpoints(release, tmp_path):
    """`--seed 1` after a seed-0 run in the same folder retrains: it must not resume seed-0's finished Trainer
    checkpoints, train 0 steps and publish seed-0's weights under a seed-1 summary."""
    import shutil

    from safetensors.torch import load_file

    out, _ = release
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.partial"))
    before = load_file(str(copy / "calm-base" / "model.safetensors"))
    summary = main_command.run(
        ["--size", "tiny", "--output_dir", str(copy), "--bf16", "false", "--seed", "1"]
    )
    for stage in ("corpus", "train_tokenizer", "tokenize", "pretrain"):
        assert not summary["timings"][stage]["reused"], stage
    after = load_file(str(copy / "calm-base" / "model.safetensors"))
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert json.loads((copy / "calm-base" / "run_summary.json").read_text())["timings"]["pretrain"]["reused"] is False
    # the tokenizer was retrained too (its weights differ from seed 0's), and the release pairs with it
    tokenizer_before = load_file(str(out / "calm-base" / "tokenizer" / "model.safetensors"))
    tokenizer_after = load_file(str(copy / "calm-base" / "tokenizer" / "model.safetensors"))
    assert any(not torch.equal(tokenizer_before[name], tokenizer_after[name]) for name in tokenizer_before)


@pytest.mark.slow
def test_everyday_calls_from_the_folder(release, monkeypatch):
    out, _ = release
    monkeypatch.chdir(out)
    from transformers import AutoModel, AutoModelForCausalLM, pipeline

    from calm_hf import CalmForCausalNeuralModeling, CalmModel

    assert isinstance(AutoModel.from_pretrained("calm-base"), CalmModel)
    model = AutoModelForCausalLM.from_pretrained("calm-base")
    assert isinstance(model, CalmForCausalNeuralModeling)
    ids = torch.randint(0, model.config.vocab_size, (1, 12, 5))
    assert model.generate(input_ids=ids, max_new_tokens=3).shape == (1, 12, 8)

    forecaster = pipeline("neural-forecasting", model="calm-base")
    rng = np.random.default_rng(0)
    traces = 50.0 + 10.0 * rng.standard_normal((12, 40)).astype(np.float32)  # user units, far from z-scores
    out_single = forecaster(traces, horizon=20)
    assert out_single["forecast"].shape == (12, 20)
    assert abs(float(np.median(out_single["forecast"])) - 50.0) < 30.0  # mapped back to the input's units
    sampled = forecaster(traces, horizon=20, num_samples=3, sampling_rate=10.0)
    assert sampled["samples"].shape == (3, 12, 20) and sampled["forecast"].shape == (12, 20)
    assert np.all(sampled["quantiles"][0.05] <= sampled["quantiles"][0.95] + 1e-6)
    with pytest.raises(ValueError, match="NaN"):
        forecaster(np.full((12, 40), np.nan), horizon=5)
    with pytest.raises(ValueError, match="identity from the recording itself"):
        forecaster(traces, horizon=5, session="no-such-session")  # a foundation model needs no session


@pytest.mark.slow
def test_remote_code_load_and_generate_without_calm_hf(release):
    out, _ = release
    script = BLOCK_CALM_HF + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out / 'calm-base')!r}, trust_remote_code=True)
        backbone = AutoModel.from_pretrained({str(out / 'calm-base')!r}, trust_remote_code=True)
        tok = AutoModel.from_pretrained({str(out / 'calm-base' / 'tokenizer')!r}, trust_remote_code=True)
        codes = tok.encode(torch.randn(1, 12, 40)).codes
        seq = model.generate(input_ids=codes, max_new_tokens=4)
        print("OK", tuple(seq.shape), type(model).__module__.startswith("transformers_modules"))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK (1, 12, 14) True" in result.stdout


@pytest.mark.slow
def test_push_to_local_hub_and_load_back(release, hub_server):
    from hub_server import run_in_hub_env

    out, _ = release
    push = textwrap.dedent(
        f"""
        from calm_hf.hub import push_to_hub
        print(push_to_hub({str(out / 'calm-base')!r}, "calm-tester/calm-base", dataset_dir={str(out / 'calm-base-dataset')!r},
                          dataset_repo_id="calm-tester/calm-base-dataset"))
        """
    )
    run_in_hub_env(push, hub_server)
    load = BLOCK_CALM_HF + textwrap.dedent(
        """
        import numpy as np, torch
        from datasets import load_dataset, load_from_disk
        from transformers import AutoModel, AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("calm-tester/calm-base", trust_remote_code=True)
        tok = AutoModel.from_pretrained("calm-tester/calm-base", subfolder="tokenizer", trust_remote_code=True)
        seq = model.generate(input_ids=tok.encode(torch.randn(1, 12, 40)).codes, max_new_tokens=2)
        assert tuple(seq.shape) == (1, 12, 12), seq.shape
        import json, pathlib
        manifest = json.loads((pathlib.Path(LOCAL) / "corpus.json").read_text())
        for shard in manifest["shards"]:  # each shard of the tokenized corpus is a config of the dataset repo
            pushed = load_dataset("calm-tester/calm-base-dataset", shard["path"])
            local = load_from_disk(str(pathlib.Path(LOCAL) / shard["path"]))
            for split in local:
                assert pushed[split].features == local[split].features, (pushed[split].features, local[split].features)
                a = np.asarray(pushed[split].with_format("numpy")["input_ids"])
                b = np.asarray(local[split].with_format("numpy")["input_ids"])
                assert np.array_equal(a, b)
        print("LOADED")
        """
    ).replace("LOCAL", repr(str(out / "calm-base-dataset")))
    result = run_in_hub_env(load, hub_server)
    assert "LOADED" in result.stdout


def test_bf16_without_an_accelerator_trains_on_the_cpu(monkeypatch, tmp_path):
    # an AMX Xeon measures bf16 as faster; TrainingArguments refuses bf16 without a GPU unless use_cpu is set
    from transformers import HfArgumentParser, TrainingArguments

    from calm_hf.commands import main as main_command

    monkeypatch.setattr(main_command, "accelerator_available", lambda: False)
    flags = main_command.training_flags(tmp_path, 1.0, 4, 1e-3, 0, True, None)
    assert "--use_cpu" in flags and "--bf16" in flags
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(flags)
    assert args.use_cpu and args.bf16
    assert "--use_cpu" not in main_command.training_flags(tmp_path, 1.0, 4, 1e-3, 0, False, None)
    monkeypatch.setattr(main_command, "accelerator_available", lambda: True)
    assert "--use_cpu" not in main_command.training_flags(tmp_path, 1.0, 4, 1e-3, 0, True, None)


def test_bf16_auto_times_the_jobs_own_step_not_a_matmul(monkeypatch):
    # an AMX Xeon ran bf16 matmuls 5-6x faster, yet the cpu preset's training step 1.6x slower under bf16 autocast:
    # `auto` with a workload must follow the measured step, and never fall back to the matmul test
    from calm_hf import hardware

    monkeypatch.setattr(hardware, "bf16_is_faster", lambda device="cpu": pytest.fail("matmul test used"))
    slower = {"fp32_seconds": 0.25, "bf16_seconds": 0.41, "speedup": 0.25 / 0.41}
    faster = {"fp32_seconds": 0.30, "bf16_seconds": 0.10, "speedup": 3.0}
    assert hardware.resolve_bf16("auto", "cpu", lambda: slower) is False
    assert hardware.resolve_bf16("auto", "cpu", lambda: faster) is True
    assert hardware.resolve_bf16("true", "cpu", lambda: slower) is True
    assert hardware.resolve_bf16("false", "cpu", lambda: faster) is False


def test_step_timing_measures_the_recipes_real_models():
    from calm_hf.commands import main as main_command

    for measure in (main_command.tokenizer_step_speedup, main_command.pretrain_step_speedup):
        result = measure(main_command.RECIPES["tiny"])
        assert result["fp32_seconds"] > 0 and result["bf16_seconds"] > 0
        assert result["speedup"] == pytest.approx(result["fp32_seconds"] / result["bf16_seconds"])


def test_dtype_decision_is_kept_for_a_resumed_job(monkeypatch, tmp_path):
    # a re-measurement on resume could flip a close call and retrain finished stages (their keys hold --bf16)
    from calm_hf.commands import main as main_command

    calls = []

    def measured(speedup):
        def measure(recipe):
            calls.append(speedup)
            return {"fp32_seconds": speedup, "bf16_seconds": 1.0, "speedup": speedup}
        return measure

    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path / "cache"))  # no per-machine record from another test
    monkeypatch.setattr(main_command, "accelerator_available", lambda: False)
    monkeypatch.setattr(main_command, "tokenizer_step_speedup", measured(0.5))
    monkeypatch.setattr(main_command, "pretrain_step_speedup", measured(2.0))
    args = main_command.MainArguments(output_dir=str(tmp_path))
    recipe = main_command.resolve_recipe(args)
    first = main_command.choose_dtypes(args, recipe, tmp_path)
    assert (first["tokenizer_bf16"], first["pretrain_bf16"]) == (False, True) and len(calls) == 2
    monkeypatch.setattr(main_command, "pretrain_step_speedup", measured(0.5))
    assert main_command.choose_dtypes(args, recipe, tmp_path) == first and len(calls) == 2
    args.bf16 = "false"  # another choice is decided afresh
    assert main_command.choose_dtypes(args, recipe, tmp_path)["pretrain_bf16"] is False
    args.bf16 = "auto"  # and so is another recipe (another model or batch has another step time)
    assert main_command.choose_dtypes(args, {**recipe, "pretrain_batch": 8}, tmp_path)["pretrain_bf16"] is False
    assert len(calls) == 4


def test_pretraining_budget_plans_steps_from_the_timed_step(monkeypatch, tmp_path):
    # a fixed step count overruns the job's time on slow CPUs and wastes the budget on fast ones
    import types

    from calm_hf.commands import main as main_command

    stage = types.SimpleNamespace(path=tmp_path / "tokenized", key="tokenized-v1")
    step = {"fp32_seconds": 0.5, "bf16_seconds": 2.0}
    monkeypatch.setattr(main_command, "pretrain_step_seconds",
                        lambda recipe, tokenized, tokenizer, bf16: step["bf16_seconds" if bf16 else "fp32_seconds"])
    args = main_command.MainArguments(output_dir=str(tmp_path), pretrain_minutes=1.0, pretrain_steps=1000)
    args.dtypes = {"pretrain_bf16": False}
    recipe = main_command.resolve_recipe(args)
    steps, plan = main_command.planned_pretrain_steps(args, recipe, tmp_path, stage)
    # 0.5 s x 1.05 a step: 114 steps fit in 60 s
    assert steps == 114 and plan["steps_that_fit"] == 114
    step["fp32_seconds"] = 0.05  # a resumed job keeps its schedule even if the machine now measures faster
    assert main_command.planned_pretrain_steps(args, recipe, tmp_path, stage)[0] == 114
    fast = tmp_path / "other"
    fast.mkdir()
    assert main_command.planned_pretrain_steps(args, recipe, fast, stage)[0] == 1000  # capped by --pretrain_steps
    args.dtypes = {"pretrain_bf16": True}  # the chosen dtype's step time counts: 2.0 s x 1.05, 28 fit
    assert main_command.planned_pretrain_steps(args, recipe, fast, stage)[0] == 28
    step["bf16_seconds"] = 200.0
    slow = tmp_path / "slow"
    slow.mkdir()
    assert main_command.planned_pretrain_steps(args, recipe, slow, stage)[0] == 1  # none fit: at least one
    args.pretrain_minutes = 0  # no budget: exactly the steps asked for
    assert main_command.planned_pretrain_steps(args, main_command.resolve_recipe(args), slow, stage)[0] == 1000


def test_a_crash_between_the_two_release_switches_is_completed_by_the_next_run(release, tmp_path, monkeypatch):
    """The release switches as one: killed after `calm-base/` was replaced and before `calm-base-dataset/` was, the
    folders disagree only until the next run, which completes the switch before anything else (before: the new model
    stayed without run_summary.json beside the old dataset)."""
    import shutil

    from calm_hf import atomic
    from calm_hf.publish import release_id_of

    out, _ = release
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.partial"))
    old = release_id_of(copy / "calm-base")
    assert old is not None and release_id_of(copy / "calm-base-dataset") == old
    real_replace = atomic.replace_folder

    class Killed(BaseException):
        pass

    def killed_after_the_model(source, destination):
        real_replace(source, destination)
        raise Killed()

    monkeypatch.setattr(atomic, "replace_folder", killed_after_the_model)
    with pytest.raises(Killed):
        main_command.run(["--size", "tiny", "--output_dir", str(copy), "--bf16", "false"])
    monkeypatch.setattr(atomic, "replace_folder", real_replace)
    new = release_id_of(copy / "calm-base")
    assert new != old and release_id_of(copy / "calm-base-dataset") == old  # mid-switch
    assert json.loads((copy / "calm-base" / "run_summary.json").read_text())["release_id"] == new
    seen = {}
    monkeypatch.setattr(main_command, "run_job", lambda args, recipe, out, work: seen.update(
        model=release_id_of(out / "calm-base"), dataset=release_id_of(out / "calm-base-dataset")))
    main_command.run(["--size", "tiny", "--output_dir", str(copy), "--bf16", "false"])
    assert seen == {"model": new, "dataset": new}
    assert not list(copy.glob("*.partial")) and not (copy / ".calm-base-work" / main_command.RELEASE_JOURNAL).exists()
