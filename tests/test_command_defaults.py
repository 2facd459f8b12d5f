"""Every training command run with no optional flag trains with the measured recipe (the packaged `calm_hf/recipes/`
files the main job and the benchmarks use), explicit flags override it, and `--help` says where it was measured."""

import json
import warnings

import pytest
import torch

from calm_hf.commands import finetune_behavior, main as main_command, pretrain, tokenize, train_tokenizer
from calm_hf.commands.recipes import RECIPE_FLAGS, TRAINING_SCHEDULE, command_defaults, load_behavior_recipe, load_recipe


class _Parsed(Exception):
    pass


def parsed_arguments(module, argv, monkeypatch) -> dict:
    """The arguments `module.run(argv)` parses, as one `{field: value}` dict (the run stops right after parsing)."""
    real = module.parse_command_args

    def spy(*args, **kwargs):
        raise _Parsed(real(*args, **kwargs))

    monkeypatch.setattr(module, "parse_command_args", spy)
    with pytest.raises(_Parsed) as caught:
        module.run(argv)
    merged = {}
    for item in caught.value.args[0]:
        merged.update(vars(item))
    return merged


REQUIRED = {
    train_tokenizer: ["--trials_dataset", "trials", "--output_dir", "out"],
    pretrain: ["--tokenized_dataset", "tokens", "--tokenizer_path", "tok", "--output_dir", "out"],
    tokenize: ["--tokenizer_path", "tok", "--trials_dataset", "trials", "--output_dir", "out"],
    finetune_behavior: ["--model_name_or_path", "calm", "--tokenized_dataset", "tokens", "--output_dir", "out"],
}


def test_training_commands_without_optional_flags_use_the_cpu_recipe(monkeypatch):
    recipe = load_recipe("cpu")
    tokenizer = parsed_arguments(train_tokenizer, REQUIRED[train_tokenizer], monkeypatch)
    expected = {"preset": recipe["tokenizer_preset"], "max_segments": recipe["tokenizer_segments"], "num_train_epochs": recipe["tokenizer_epochs"],
                "per_device_train_batch_size": recipe["tokenizer_batch"], "learning_rate": recipe["tokenizer_lr"]}
    assert {name: tokenizer[name] for name in expected} == expected
    assert tokenizer["learning_rate"] != 5e-5  # not transformers' default
    # segments are whole trials (cropped to whole windows), at most the recipe's length
    assert tokenizer["segment_frames"] is None
    cap = recipe["tokenizer_segment_frames"]
    assert train_tokenizer.default_segment_frames(cap, 4) == cap and train_tokenizer.default_segment_frames(62, 4) == 60
    assert train_tokenizer.default_segment_frames(10 * cap, 4) == cap
    model = parsed_arguments(pretrain, REQUIRED[pretrain], monkeypatch)
    expected = {"preset": recipe["model_preset"], "max_neurons": recipe["max_neurons"],
                "max_steps": recipe["pretrain_steps"], "per_device_train_batch_size": recipe["pretrain_batch"],
                "learning_rate": recipe["pretrain_lr"]}
    assert {name: model[name] for name in expected} == expected
    for parsed in (tokenizer, model):
        assert str(parsed["lr_scheduler_type"].value) == TRAINING_SCHEDULE["lr_scheduler_type"]
        assert (parsed["warmup_steps"], parsed["weight_decay"]) == (TRAINING_SCHEDULE["warmup_steps"],
                                                                    TRAINING_SCHEDULE["weight_decay"])


def test_the_recipe_defaults_are_what_the_main_job_passes_its_stages(monkeypatch, tmp_path):
    """One source: the flags the main job gives each stage parse to the same values as the stage run bare."""
    recipe = load_recipe("cpu")
    stages = {
        train_tokenizer: main_command.tokenizer_stage_argv(recipe, tmp_path / "trials", tmp_path / "out", 0, False,
                                                           False),
        pretrain: main_command.pretrain_stage_argv(recipe, tmp_path / "tokens", tmp_path / "tok", tmp_path / "out",
                                                   recipe["pretrain_steps"], 0, False, False),
        tokenize: main_command.tokenize_stage_argv(tmp_path / "tok", tmp_path / "trials", False)
        + ["--output_dir", "out"],
    }
    command = {train_tokenizer: "train-tokenizer", pretrain: "pretrain", tokenize: "tokenize"}
    for module, argv in stages.items():
        by_main = parsed_arguments(module, argv, monkeypatch)
        bare = parsed_arguments(module, REQUIRED[module], monkeypatch)
        for name in [*RECIPE_FLAGS[command[module]], *(TRAINING_SCHEDULE if module is not tokenize else ()),
                     *(("batch_size", "bf16") if module is tokenize else ())]:
            assert by_main[name] == bare[name], (module.__name__, name)
        if module is train_tokenizer:  # the main corpus' trials are whole segments of the recipe's length
            trial_frames = int(recipe["trial_seconds"] * 5.0)
            assert train_tokenizer.default_segment_frames(trial_frames, 4) == by_main["segment_frames"]


def test_explicit_flags_override_the_recipe(monkeypatch):
    tokenizer = parsed_arguments(train_tokenizer, REQUIRED[train_tokenizer] + ["--learning_rate", "1e-4",
                                                                                 "--segment_frames", "48"], monkeypatch)
    assert (tokenizer["learning_rate"], tokenizer["segment_frames"]) == (1e-4, 48)
    # epochs alone mean epochs: the recipe's step count gives way instead of silently overriding them
    model = parsed_arguments(pretrain, REQUIRED[pretrain] + ["--num_train_epochs", "2"], monkeypatch)
    assert (model["num_train_epochs"], model["max_steps"]) == (2.0, -1)
    model = parsed_arguments(pretrain, REQUIRED[pretrain] + ["--max_steps", "7"], monkeypatch)
    assert model["max_steps"] == 7 and model["learning_rate"] == load_recipe("cpu")["pretrain_lr"]


def test_a_config_file_overrides_the_recipe(monkeypatch, tmp_path):
    config = tmp_path / "pretrain.json"
    config.write_text('{"tokenized_dataset": "tokens", "tokenizer_path": "tok", "output_dir": "out", '
                      '"learning_rate": 0.0001, "num_train_epochs": 3}')
    model = parsed_arguments(pretrain, ["--config", str(config)], monkeypatch)
    assert (model["learning_rate"], model["num_train_epochs"], model["max_steps"]) == (1e-4, 3.0, -1)


def test_finetune_behavior_without_optional_flags_uses_the_behaviour_recipe(monkeypatch):
    recipe = load_behavior_recipe()
    parsed = parsed_arguments(finetune_behavior, REQUIRED[finetune_behavior], monkeypatch)
    assert (parsed["learning_rate"], parsed["weight_decay"], parsed["per_device_train_batch_size"],
            parsed["num_train_epochs"], parsed["early_stopping_patience"]) == (
        recipe["learning_rate"], recipe["weight_decay"], recipe["batch_size"], recipe["max_epochs"], recipe["patience"])
    assert str(parsed["eval_strategy"].value) == "epoch"


@pytest.mark.parametrize("command, measured", [("train-tokenizer", "foundation.json"), ("pretrain", "foundation.json"),
                                               ("tokenize", "foundation.json"),
                                               ("finetune-behavior", "behavior.json")])
def test_help_says_where_the_defaults_were_measured(command, measured, capsys):
    from calm_hf.cli import main

    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"benchmarks/results/{measured}" in text and "calm_hf/recipes/" in text
    for value in command_defaults(command).values():  # every recipe default is shown as the default
        assert f"(default: {value})" in text


def test_best_validation_callback_stops_and_keeps_the_best_weights():
    from transformers import TrainerControl, TrainerState

    from calm_hf.callbacks import BestValidationCallback

    model = torch.nn.Linear(2, 1)
    callback = BestValidationCallback("mse", patience=2)
    state, control = TrainerState(), TrainerControl()
    best = None
    for step, score in enumerate([1.0, 0.5, 0.7, 0.6]):
        state.global_step = step
        with torch.no_grad():
            model.weight.fill_(score)
        callback.on_evaluate(None, state, control, metrics={"eval_mse": score}, model=model)
        if score == 0.5:
            best = model.weight.detach().clone()
    assert control.should_training_stop and callback.record == {"best": 0.5, "best_step": 1, "stopped_early": True}
    callback.on_train_end(None, state, control, model=model)
    assert torch.equal(model.weight, best)
    with pytest.raises(ValueError, match="patience"):
        BestValidationCallback("mse", patience=0)


def test_training_on_the_cpu_does_not_warn_about_pinned_memory(tmp_path):
    """Pinned memory serves accelerators only: a CPU run neither asks for it nor prints torch's warning about it."""
    import datasets
    from transformers import TrainingArguments, default_data_collator

    from calm_hf import CalmTokenizer, CalmTokenizerConfig
    from calm_hf.trainer import CalmTrainer

    data = datasets.Dataset.from_dict({"input_values": torch.randn(8, 1, 16).tolist()}).with_format("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: pinned memory is in use")
    # without --use_cpu transformers leaves pinned memory on, also on a machine with no accelerator
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                             save_strategy="no", disable_tqdm=True)
    assert args.dataloader_pin_memory
    trainer = CalmTrainer(model=CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")), args=args,
                          train_dataset=data, data_collator=default_data_collator)
    assert trainer.args.dataloader_pin_memory is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "pin_memory" in str(w.message)]


def test_adapt_without_optional_flags_uses_the_benchmarked_adaptation_recipe(monkeypatch):
    """`calm adapt` on a data-identity model fine-tunes with `AdaptationSettings` (what benchmarks/foundation.py runs
    as calm_adapted) and fits the population readout (calm_readout), not with transformers' training defaults."""
    from dataclasses import fields

    from calm_hf.adaptation import AdaptationSettings
    from calm_hf.commands import adapt

    args = parsed_arguments(adapt, ["--model_path", "calm", "--tokenized_dataset", "tokens", "--output_dir", "out"],
                            monkeypatch)
    recipe = AdaptationSettings()
    assert args["population_readout"] is True
    for item in fields(AdaptationSettings):
        flag = {"max_seconds": "adapt_max_minutes", "max_neurons": None, "weight_decay": None, "seed": None}.get(
            item.name, f"adapt_{item.name}")
        if flag == "adapt_max_minutes":
            assert args[flag] * 60 == recipe.max_seconds
        elif flag is not None:
            assert args[flag] == getattr(recipe, item.name), flag


def test_the_main_job_passes_model_config_overrides_and_the_trial_loading_share_to_its_stages(monkeypatch, tmp_path):
    args = main_command.MainArguments(model_config_overrides='{"identity_coupling_skill": true}',
                                      corpus_trial_loading=0.25)
    recipe = main_command.resolve_recipe(args)
    assert recipe["model_config_overrides"] == {"identity_coupling_skill": True}
    assert recipe["corpus_trial_loading"] == 0.25
    argv = main_command.pretrain_stage_argv(recipe, tmp_path / "tokens", tmp_path / "tok", tmp_path / "out", 5, 0,
                                            False, False)
    parsed = parsed_arguments(pretrain, argv, monkeypatch)
    assert json.loads(parsed["config_overrides"]) == {"identity_coupling_skill": True}
    plain = main_command.resolve_recipe(main_command.MainArguments())
    assert plain["model_config_overrides"] == {} and plain["corpus_trial_loading"] == 0.0
    assert "--config_overrides" not in main_command.pretrain_stage_argv(plain, tmp_path, tmp_path, tmp_path, 5, 0,
                                                                        False, False)
    for bad in ('{"identity_coupling_skill": tru', '[1, 2]'):
        with pytest.raises(ValueError, match="model_config_overrides must be a JSON object"):
            main_command.resolve_recipe(main_command.MainArguments(model_config_overrides=bad))
