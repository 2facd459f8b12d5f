"""`calm main`: from nothing to a pretrained `calm-base/` checkpoint with a model card, on the simulated corpus.

    calm main                       # or: calm-main, python -m calm_hf.commands.main
    calm main --fresh               # start over instead of reusing finished stages
    calm main --size tiny --output_dir /tmp/x   # seconds-long smoke version (tests use it)
    calm main --config my_recipe.json   # a recipe file (the packaged ones: calm_hf/recipes/main_<size>.json)

Stages: simulate -> train tokenizer -> tokenize to `datasets` -> pretrain the dual-axis transformer -> evaluate
forecasting on held-out trials -> write `calm-base/` (DAT weights, `tokenizer/`, generation config, remote-code
files, model card with this run's numbers, forecast figure) and `calm-base-dataset/` (tokenized trials + card).
Each stage is the package's own command module (`calm_hf.commands.prepare`, `.train_tokenizer`, `.tokenize`,
`.pretrain`), called with the command line a user would type.

Re-running reuses every finished stage (a stage is finished when its folder holds a `.calm_stage.json` written with
the same parameters: its command's whole command line and the keys of the stages it reads) and resumes an
interrupted training stage from its last *complete* Trainer checkpoint of the same parameters (a stage folder written
with other parameters is removed with its checkpoints first). Data stages are written to `.partial` and renamed into
place; markers are written atomically; SIGTERM stops the job cleanly and stale `.partial` folders are removed on the
next run (`calm_hf.commands.stages`).

The release (`calm-base/` with its card and `run_summary.json`, and `calm-base-dataset/`) is staged whole and then
switched as one through a journal in the work folder (`calm_hf.atomic.switch_folders`); a run killed during the
switch is completed by the next run before anything else. Both folders carry the same release id. An existing
`calm-base/` or `calm-base-dataset/` that the main job did not write is refused unless `--overwrite`.

Model and tokenizer architecture come only from the named presets (`CalmConfig.from_preset`,
`CalmTokenizerConfig.from_preset`); `RECIPES`, read from the packaged `calm_hf/recipes/main_<size>.json`, holds what
a run does with them (data size, epochs, batch, learning rate, neurons per example).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..atomic import atomic_write_text, claim_output_folder, finish_switch, partial_path, remove_stale_partials
from . import OutputArguments, parse_command_args, run_command
from . import pretrain, tokenize, train_tokenizer
from .recipes import RECIPE_FIELDS, TRAINING_SCHEDULE, load_recipe, recipe_path  # noqa: F401 - the recipe API
from .stages import Stage, run_stage, stage_argv, terminate_cleanly

logger = logging.getLogger("calm_hf.main")

STEP_TIME_MARGIN = 1.05  # the trainer's own work beyond the timed step (logging, checkpoints)
PLAN_FILE = "job_plan.json"  # the dtype decision, the timed steps and the pretraining schedule of a work folder
RELEASE_JOURNAL = "release_switch.json"  # the switch of the release folders in progress (see `run_job`)
# Training recipes of the main job, one JSON file per size shipped inside the package (`calm_hf/recipes/`, read by
# `calm_hf.commands.recipes`; the files `calm main --config` also reads, and the stage commands' defaults). "cpu" is
# the default run on 2 cores; "tiny" is the smoke run of the tests; "paper" pairs the paper's architecture presets
# with a longer schedule. `tokenizer_preset` / `model_preset` name
# architecture presets; every architecture number lives in those presets. Why the cpu recipe is what it is:
# training/README.md.
RECIPES = {size: load_recipe(size) for size in ("cpu", "tiny", "paper")}


@dataclass
class MainArguments:
    output_dir: str = field(default=".", metadata={"help": "Where calm-base/ and calm-base-dataset/ are written."})
    size: str = field(default="cpu", metadata={"help": "Recipe: cpu (the real run), tiny (a seconds-long smoke run) "
                                                       "or paper (the paper's model sizes)."})
    fresh: bool = field(default=False, metadata={"help": "Delete earlier stages and start over."})
    seed: int = field(default=0, metadata={"help": "Seed of the simulation, the splits and training."})
    bf16: str = field(
        default="auto",
        metadata={"help": "bf16 autocast: auto (measured: each stage's own training step is timed in fp32 and bf16 "
                          "in interleaved rounds, and bf16 is used only where it is clearly faster; the decision is "
                          "printed, written into the model card and recorded per machine in "
                          "$CALM_CACHE_DIR/bf16_decisions.json (default ~/.cache/calm_hf), so the same recipe on the "
                          "same machine decides the same; delete that file to measure again), true, false."},
    )
    use_cpu: bool = field(
        default=False, metadata={"help": "Train on the CPU even when an accelerator is present (default: accelerate's "
                                          "choice, i.e. the GPU when there is one)."}
    )
    model_name: str = field(default="calm-base", metadata={"help": "Name of the checkpoint folder."})
    # recipe overrides: None keeps the --size recipe's value
    corpus_sessions: int | None = field(default=None, metadata={"help": "Override the recipe's simulated sessions of "
                                                                        "the pretraining corpus."})
    corpus_trials: int | None = field(default=None, metadata={"help": "Override the trials per simulated session."})
    corpus_max_neurons: int | None = field(default=None, metadata={"help": "Override the neurons stored per session."})
    corpus_real: list[str] | None = field(
        default=None, metadata={"help": "Override the real recordings whose training trials join the corpus (names of "
                                        "calm_hf.data.corpus.REAL_RECORDINGS, e.g. park/mrcuts24 cascade)."})
    corpus_trial_loading: float | None = field(
        default=None, metadata={"help": "Override the share of simulated sessions whose shared-input loadings change "
                                        "from trial to trial (calm_hf.data.corpus.TRIAL_LOADING_RANGES)."})
    trial_seconds: float | None = field(default=None, metadata={"help": "Override the simulated trial length (s)."})
    tokenizer_preset: str | None = field(default=None, metadata={"help": "Override the tokenizer architecture preset."})
    tokenizer_epochs: float | None = field(default=None, metadata={"help": "Override the tokenizer's epochs."})
    tokenizer_batch: int | None = field(default=None, metadata={"help": "Override the tokenizer's batch size."})
    tokenizer_lr: float | None = field(default=None, metadata={"help": "Override the tokenizer's learning rate."})
    tokenizer_segments: int | None = field(default=None, metadata={"help": "Override the cap on tokenizer segments."})
    tokenizer_segment_frames: int | None = field(default=None, metadata={"help": "Override the tokenizer's segment frames."})
    model_preset: str | None = field(default=None, metadata={"help": "Override the dual-axis transformer preset."})
    model_config_overrides: str | None = field(
        default=None, metadata={"help": "Override the recipe's CalmConfig fields set on top of the preset: a JSON "
                                        "object, e.g. '{\"identity_coupling_skill\": true}' (calm pretrain "
                                        "--config_overrides)."})
    pretrain_steps: int | None = field(
        default=None, metadata={"help": "Override the recipe's pretraining steps (with a --pretrain_minutes budget: "
                                        "the most steps the budget may plan)."})
    pretrain_minutes: float | None = field(
        default=None, metadata={"help": "Override the recipe's pretraining budget: the steps are planned from the "
                                        "measured step time so pretraining fits these minutes (capped by "
                                        "--pretrain_steps). 0 = no budget: exactly --pretrain_steps."})
    pretrain_batch: int | None = field(default=None, metadata={"help": "Override the pretraining batch size."})
    pretrain_lr: float | None = field(default=None, metadata={"help": "Override the pretraining learning rate."})
    max_neurons: int | None = field(default=None, metadata={"help": "Override the neurons per pretraining example."})
    context_token_steps: int | None = field(
        default=None, metadata={"help": "Override the token steps of context calm-base's forecasts read."})
    eval_sessions: int | None = field(default=None, metadata={"help": "Override the held-out simulated sessions per "
                                                                      "evaluated set of the model card."})
    eval_trials: int | None = field(default=None, metadata={"help": "Override the test trials scored per held-out "
                                                                    "session (default all)."})
    eval_sets: list[str] | None = field(
        default=None, metadata={"help": "Override the held-out sets of the model card (calm_hf.heldout.SETS)."})
    eval_max_neurons: int | None = field(
        default=None, metadata={"help": "Override the cap on neurons of the held-out simulated sessions."})
    forecast_samples: int | None = field(default=None, metadata={"help": "Override the samples of the card's figure."})


def resolve_recipe(args: MainArguments) -> dict:
    """The `--size` recipe with every field given on the command line (or in `--config`) replacing its value."""
    if args.size not in RECIPES:
        raise ValueError(f"--size {args.size!r} is not one of {sorted(RECIPES)}.")
    recipe = dict(RECIPES[args.size])
    for item in fields(MainArguments):
        value = getattr(args, item.name)
        if item.name in recipe and value is not None:
            recipe[item.name] = value
    overrides = recipe["model_config_overrides"]
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as error:
            raise ValueError(f"--model_config_overrides must be a JSON object, e.g. "
                             f"'{{\"identity_coupling_skill\": true}}': {error}.") from None
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"--model_config_overrides must be a JSON object of CalmConfig fields, got {overrides!r}.")
    recipe["model_config_overrides"] = overrides or {}
    recipe["corpus_trial_loading"] = float(recipe["corpus_trial_loading"] or 0.0)
    return recipe


def accelerator_available() -> bool:
    """A CUDA, XPU or MPS device that the Trainer would pick over the CPU."""
    if torch.cuda.is_available():
        return True
    xpu, mps = getattr(torch, "xpu", None), getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


def training_flags(output_dir: Path, epochs: float, batch: int, lr: float, seed: int, bf16: bool, resume: str | None,
                   use_cpu: bool = False) -> list[str]:
    """The TrainingArguments flags both training stages share (cosine schedule, checkpoints every 200 steps)."""
    flags = [
        "--output_dir", str(output_dir), "--num_train_epochs", str(epochs),
        "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", str(batch),
        "--learning_rate", str(lr),
        *(item for flag, value in TRAINING_SCHEDULE.items() for item in (f"--{flag}", str(value))),
        "--seed", str(seed), "--data_seed", str(seed),
        "--logging_steps", "25", "--save_strategy", "steps", "--save_steps", "200", "--save_total_limit", "1",
        "--report_to", "none", "--dataloader_num_workers", "0", "--disable_tqdm", "False",
    ]
    # bf16 without a GPU is CPU autocast, which TrainingArguments only accepts together with use_cpu (an AMX Xeon
    # measures bf16 as faster, and the main job then failed with "Your setup doesn't support bf16/gpu")
    if use_cpu or (bf16 and not accelerator_available()):
        flags.append("--use_cpu")
    if bf16:
        flags.append("--bf16")
    if resume:
        flags += ["--resume_from_checkpoint", resume]
    return flags


def run(argv: list[str] | None = None) -> dict:
    """Parse `argv` (see `MainArguments`), run every stage not finished yet, write the release folders and return the
    summary (metrics, timings, folders)."""
    args, output = parse_command_args((MainArguments, OutputArguments), argv, prog="calm main", trains=True)
    recipe = resolve_recipe(args)
    out = Path(args.output_dir).resolve()
    work = out / f".{args.model_name}-work"
    # first complete a release switch a crash interrupted (its staged folders are `.partial`s the cleanup below removes)
    finished = finish_switch(work / RELEASE_JOURNAL)
    if finished is not None:
        logger.info("completed the switch to release %s that the previous run was interrupted in",
                    finished.get("release_id"))
    for folder in release_folders(args, out):  # refused now rather than after the training stages
        claim_output_folder(folder, "main", [work], overwrite=output.overwrite)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    args.dtypes = choose_dtypes(args, recipe, work)
    torch.manual_seed(args.seed)
    # staging folders/files of a killed run are never read: remove them (the job's own names only)
    remove_stale_partials(work, max_depth=3)
    for stale in (*map(partial_path, release_folders(args, out)),
                  *(partial_path(folder.with_name(folder.name + ".old")) for folder in release_folders(args, out))):
        if stale.exists():
            logger.info("removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
    with terminate_cleanly():
        return run_job(args, recipe, out, work)


def release_folders(args: MainArguments, out: Path) -> tuple[Path, Path]:
    """(model folder, dataset folder) of the release: `calm-base/` and `calm-base-dataset/` under `--output_dir`."""
    return out / args.model_name, out / f"{args.model_name}-dataset"


def tokenizer_step_speedup(recipe: dict) -> dict:
    """fp32 vs bf16-autocast time of one training step of the recipe's tokenizer on a batch of its segment size."""
    from ..configuration_calm_tokenizer import CalmTokenizerConfig
    from ..hardware import bf16_training_speedup
    from ..modeling_calm_tokenizer import CalmTokenizer

    config = CalmTokenizerConfig.from_preset(recipe["tokenizer_preset"])
    frames = recipe["tokenizer_segment_frames"] // config.window_size * config.window_size
    generator = torch.Generator().manual_seed(0)
    batch = {"input_values": torch.randn(recipe["tokenizer_batch"], 1, frames, generator=generator)}
    return bf16_training_speedup(lambda: CalmTokenizer(config), batch)


def recipe_token_steps(recipe: dict) -> int:
    """Token steps of a simulated corpus trial: `trial_seconds` at the model rate, in whole windows."""
    from ..configuration_calm import CalmConfig
    from ..configuration_calm_tokenizer import CalmTokenizerConfig

    window = CalmTokenizerConfig.from_preset(recipe["tokenizer_preset"]).window_size
    rate = CalmConfig.from_preset(recipe["model_preset"]).frame_rate_hz
    return max(2, int(recipe["trial_seconds"] * rate) // window)


def pretrain_step_speedup(recipe: dict) -> dict:
    """fp32 vs bf16-autocast time of one pretraining step of the recipe's dual-axis transformer on a batch of its
    shape (pretrain_batch x max_neurons x a corpus trial's token steps, with the head's trace targets)."""
    from ..configuration_calm import CalmConfig
    from ..configuration_calm_tokenizer import CalmTokenizerConfig
    from ..hardware import bf16_training_speedup
    from ..identity_calm import compute_neuron_identity, identity_settings
    from ..modeling_calm import CalmForCausalNeuralModeling

    tokenizer = CalmTokenizerConfig.from_preset(recipe["tokenizer_preset"])
    steps = recipe_token_steps(recipe)
    config = CalmConfig.from_preset(recipe["model_preset"], **{
        **recipe["model_config_overrides"], "vocab_size": tokenizer.codebook_size,
        "window_size": tokenizer.window_size, "max_token_steps": max(steps, 64)})
    width, rows = recipe["max_neurons"] or 64, recipe["pretrain_batch"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (rows, width, steps), generator=generator)
    batch = {"input_ids": input_ids, "labels": input_ids}
    if config.neuron_identity == "data":
        reference = torch.randn(4, width, steps * tokenizer.window_size, generator=generator)
        batch["neuron_identity"] = compute_neuron_identity(reference, width, **identity_settings(config)).expand(
            rows, -1, -1)
    else:
        batch.update(neuron_ids=torch.arange(width).expand(rows, width), session_ids=torch.zeros(rows, dtype=torch.long))
    if config.value_head_steps > 0:
        batch["value_labels"] = torch.randn(rows, width, steps * tokenizer.window_size, generator=generator)
    return bf16_training_speedup(lambda: CalmForCausalNeuralModeling(config), batch)


def pretrain_step_seconds(recipe: dict, tokenized: Stage, tokenizer: Stage, bf16: bool) -> float:
    """Seconds of one pretraining step on real batches of the tokenized corpus (`pretrain.stream_step_seconds`)."""
    return pretrain.stream_step_seconds(str(tokenized.path), str(tokenizer.path), recipe["model_preset"],
                                        recipe["max_neurons"], recipe["pretrain_batch"], bf16=bf16,
                                        config_overrides=recipe["model_config_overrides"] or None)


def planned_pretrain_steps(args: MainArguments, recipe: dict, work: Path, tokenized: Stage,
                           tokenizer: Stage | None = None) -> tuple[int, dict]:
    """(steps, plan): the recipe's `pretrain_steps`, or with a `pretrain_minutes` budget the most steps (at most the
    recipe's) that fit the budget at the step time measured on real batches of this machine, dtype and corpus (times
    STEP_TIME_MARGIN). Decided once per work folder, like the dtype, so a resumed job keeps its schedule (the
    pretraining stage's key holds it)."""
    minutes = recipe.get("pretrain_minutes")
    if not minutes:
        return recipe["pretrain_steps"], {"budget_minutes": None, "steps": recipe["pretrain_steps"]}
    record = work / PLAN_FILE
    saved = json.loads(record.read_text()) if record.exists() else {}
    key = {"minutes": minutes, "max_steps": recipe["pretrain_steps"], "batch": recipe["pretrain_batch"],
           "bf16": args.dtypes["pretrain_bf16"], "tokenized": tokenized.key}
    if recipe["model_config_overrides"]:  # another architecture, another step time (absent: plans made before stay)
        key["model_config_overrides"] = recipe["model_config_overrides"]
    if saved.get("pretrain_plan", {}).get("key") == key:
        plan = saved["pretrain_plan"]
        logger.info("pretraining schedule as planned when this job started: %d steps", plan["steps"])
        return plan["steps"], plan
    step_seconds = pretrain_step_seconds(recipe, tokenized, tokenizer, args.dtypes["pretrain_bf16"]) * STEP_TIME_MARGIN
    fit = int(minutes * 60.0 / step_seconds)
    steps = int(min(recipe["pretrain_steps"], max(1, fit)))
    plan = {"key": key, "budget_minutes": minutes, "max_steps": recipe["pretrain_steps"],
            "timed_step_seconds": round(step_seconds / STEP_TIME_MARGIN, 4), "margin": STEP_TIME_MARGIN,
            "steps_that_fit": fit, "steps": steps}
    logger.info("pretraining budget %.1f min: a step takes %.3f s here, so %d steps (%d would fit, at most %d)",
                minutes, step_seconds / STEP_TIME_MARGIN, steps, fit, recipe["pretrain_steps"])
    atomic_write_text(record, json.dumps({**saved, "pretrain_plan": plan}, indent=2))
    return steps, plan


def choose_dtypes(args: MainArguments, recipe: dict, work: Path) -> dict:
    """bf16 autocast on or off for the tokenizer stages and for pretraining + evaluation. `--bf16 auto` times each
    stage's own training step both ways on the CPU (`calm_hf.hardware.bf16_decision`): a fast bf16 matmul does not
    make this small model's step faster (AMX Xeon: 0.41 s bf16 vs 0.25 s fp32). The decision is written to the work
    folder (PLAN_FILE) and reused when the job resumes with the same recipe, so a noisy re-measurement cannot retrain
    finished stages; it is also recorded per machine, so a fresh job with the same recipe decides the same. The
    reasons are printed and go into the model card."""
    from ..hardware import bf16_decision

    record = work / PLAN_FILE
    on_cpu = args.use_cpu or not accelerator_available()
    choice = args.bf16 if isinstance(args.bf16, str) else str(args.bf16).lower()
    if record.exists():
        saved = json.loads(record.read_text())
        # reused only for the same recipe: another model or batch has another step time
        if saved.get("choice") == choice and saved.get("recipe") == recipe:
            logger.info("bf16 autocast as decided when this job started (%s)", record)
            print_dtypes(saved)
            return saved
    device = "cpu" if on_cpu else "cuda"
    decided: dict = {"choice": choice, "recipe": recipe, "reasons": {}}
    for stage, label, measure in (("tokenizer", "tokenizer", tokenizer_step_speedup),
                                  ("pretrain", "pretraining", pretrain_step_speedup)):
        decision = bf16_decision(choice, device, lambda measure=measure: measure(recipe), name=label,
                                 record_key={"recipe": recipe})
        decided[f"{stage}_bf16"] = decision["bf16"]
        decided["reasons"][label] = decision["reason"]
        if decision["measured"] is not None:  # kept: the pretraining budget plans its epochs from the same timed step
            decided[f"{stage}_step"] = decision["measured"]
    atomic_write_text(record, json.dumps(decided, indent=2))
    print_dtypes(decided)
    return decided


def print_dtypes(decided: dict) -> None:
    for label, reason in (decided.get("reasons") or {}).items():
        print(f"bf16 autocast for {label}: {reason}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-main` (and `calm main`): returns the exit code."""
    return run_command("main", lambda: run(argv))


def corpus_stage(args: MainArguments, recipe: dict, work: Path, timings: dict) -> tuple[Stage, dict]:
    """1. the pretraining corpus: simulated regimes and real recordings (`calm_hf.data.corpus.build_corpus`), written as
    shards into an atomic stage folder."""
    from ..data.corpus import CorpusSpec, build_corpus
    from ..hardware import default_num_threads

    real = [name for name in recipe["corpus_real"] or [] if real_recording_available(name)]
    spec = CorpusSpec(num_simulated_sessions=recipe["corpus_sessions"], trials_per_session=recipe["corpus_trials"],
                      max_stored_neurons=recipe["corpus_max_neurons"], trial_seconds=recipe["trial_seconds"],
                      real_recordings=real, seed=args.seed,
                      trial_loading_chance=recipe["corpus_trial_loading"])
    # a field at its "off" value stays out of the stage's key, so corpora built before it existed are reused
    params = {key: value for key, value in asdict(spec).items()
              if key != "data_dir" and not (key == "trial_loading_chance" and not value)}
    stage = Stage(work / "corpus", {"corpus": params}, atomic=True)
    run_stage(stage, "corpus", lambda: build_corpus(spec, stage.output, workers=default_num_threads()) and None,
              timings)
    return stage, params


def real_recording_available(name: str) -> bool:
    """Whether a real recording of the corpus is on this machine (the main job runs without `../shared/data` too)."""
    from ..data import default_data_dir
    from ..data.io import CASCADE_FILE, PARK_FOLDER, TRIPLETT_FILE

    relative = {"park": PARK_FOLDER, "zebrafish": TRIPLETT_FILE, "cascade": CASCADE_FILE}[name.split("/")[0]]
    path = default_data_dir() / relative
    if not path.exists():
        logger.warning("%s is not at %s: the corpus goes without it", name, path)
        return False
    return True


def tokenizer_stage_argv(recipe: dict, trials: Path, output_dir: Path, seed: int, bf16: bool,
                         use_cpu: bool) -> list[str]:
    """`calm train-tokenizer`'s command line in the main job: the recipe's tokenizer fields."""
    return ["--trials_dataset", str(trials), "--preset", recipe["tokenizer_preset"],
            "--max_segments", str(recipe["tokenizer_segments"]),
            "--segment_frames", str(recipe["tokenizer_segment_frames"])] + training_flags(
        output_dir, recipe["tokenizer_epochs"], recipe["tokenizer_batch"], recipe["tokenizer_lr"], seed, bf16, None,
        use_cpu=use_cpu)


def tokenize_stage_argv(tokenizer: Path, trials: Path, bf16: bool) -> list[str]:
    """`calm tokenize`'s command line in the main job (without `--output_dir`)."""
    return ["--tokenizer_path", str(tokenizer), "--trials_dataset", str(trials)] + (["--bf16"] if bf16 else [])


def pretrain_stage_argv(recipe: dict, tokenized: Path, tokenizer: Path, output_dir: Path, steps: int, seed: int,
                        bf16: bool, use_cpu: bool) -> list[str]:
    """`calm pretrain`'s command line in the main job: the recipe's pretraining fields, `steps` planned from the
    budget."""
    return ["--tokenized_dataset", str(tokenized), "--tokenizer_path", str(tokenizer),
            "--preset", recipe["model_preset"], "--max_neurons", str(recipe["max_neurons"]),
            *(["--context_token_steps", str(recipe["context_token_steps"])] if recipe["context_token_steps"] else []),
            "--forecast_eval_trials", "0", "--identity_init", "coupling", "--value_skip_init", "ridge",
            *(["--config_overrides", json.dumps(recipe["model_config_overrides"], sort_keys=True)]
              if recipe["model_config_overrides"] else []),
            "--max_steps", str(steps)] + training_flags(
        output_dir, 1.0, recipe["pretrain_batch"], recipe["pretrain_lr"], seed, bf16, None, use_cpu=use_cpu)


def tokenizer_stage(args: MainArguments, recipe: dict, work: Path, trials: Stage, timings: dict) -> Stage:
    """2. train the tokenizer: `calm train-tokenizer`, resumed from its last complete checkpoint."""
    path = work / "tokenizer"
    argv = tokenizer_stage_argv(recipe, trials.path, path, args.seed, args.dtypes["tokenizer_bf16"], args.use_cpu)
    stage = Stage(path, {"after": [trials.key], "argv": stage_argv(argv)})

    def train():
        resume = stage.last_checkpoint()
        return {"metrics": train_tokenizer.run(argv + (["--resume_from_checkpoint", resume] if resume else []))}

    run_stage(stage, "train_tokenizer", train, timings)
    return stage


def tokenize_stage(args: MainArguments, work: Path, trials: Stage, tokenizer: Stage, timings: dict) -> Stage:
    """3. tokenize: `calm tokenize` of every split, into an atomic stage folder."""
    argv = tokenize_stage_argv(tokenizer.path, trials.path, args.dtypes["tokenizer_bf16"])
    stage = Stage(work / "tokenized", {"after": [trials.key, tokenizer.key], "argv": stage_argv(argv)}, atomic=True)
    run_stage(stage, "tokenize", lambda: tokenize.run(argv + ["--output_dir", str(stage.output)]) and None, timings)
    return stage


def pretrain_stage(args: MainArguments, recipe: dict, work: Path, tokenizer: Stage, tokenized: Stage,
                   timings: dict) -> Stage:
    """4. pretrain: `calm pretrain` of the dual-axis transformer, resumed from its last complete checkpoint."""
    path = work / "pretrain"
    steps, args.pretrain_plan = planned_pretrain_steps(args, recipe, work, tokenized, tokenizer)
    argv = pretrain_stage_argv(recipe, tokenized.path, tokenizer.path, path, steps, args.seed,
                               args.dtypes["pretrain_bf16"], args.use_cpu)
    stage = Stage(path, {"after": [tokenizer.key, tokenized.key], "argv": stage_argv(argv)})

    def train():
        resume = stage.last_checkpoint()
        return {"metrics": pretrain.run(argv + (["--resume_from_checkpoint", resume] if resume else []))}

    run_stage(stage, "pretrain", train, timings)
    return stage


def run_job(args: MainArguments, recipe: dict, out: Path, work: Path) -> dict:
    """Every stage in order (each key covers all it depends on, so a change anywhere - seed, sizes, dtype, schedule -
    re-runs it and everything downstream), then evaluation and the release: both folders and `run_summary.json` are
    staged, then switched as one (`calm_hf.atomic.switch_folders`, journal `RELEASE_JOURNAL` in the work folder)."""
    from ..atomic import switch_folders
    from ..publish import stage_release

    timings: dict[str, dict] = {}
    total_start = time.perf_counter()
    trials, corpus_params = corpus_stage(args, recipe, work, timings)
    tokenizer = tokenizer_stage(args, recipe, work, trials, timings)
    tokenized = tokenize_stage(args, work, trials, tokenizer, timings)
    pretrained = pretrain_stage(args, recipe, work, tokenizer, tokenized, timings)
    # 5. evaluate + 6. write the checkpoint
    start = time.perf_counter()
    model_dir, dataset_dir = release_folders(args, out)
    summary = stage_release(
        pretrain_dir=pretrained.path,
        tokenized_dir=tokenized.path,
        model_dir=model_dir,
        dataset_dir=dataset_dir,
        evaluation=dict(sets=recipe["eval_sets"], sessions=recipe["eval_sessions"], test_trials=recipe["eval_trials"],
                        max_neurons=recipe["eval_max_neurons"], seed=args.seed),
        forecast_samples=recipe["forecast_samples"],
        bf16=args.dtypes["pretrain_bf16"],
        device="cpu" if args.use_cpu else None,
        run_info={
            "size": args.size,
            "seed": args.seed,
            "corpus": corpus_params,
            "tokenizer_training": tokenizer.params,
            "pretraining": pretrained.params,
            "pretraining_budget": {k: v for k, v in args.pretrain_plan.items() if k != "key"},
            "bf16_autocast": args.dtypes.get("reasons", {}),
            "stage_seconds": {k: round(v["seconds"], 1) for k, v in timings.items()},
        },
    )
    staged = summary.pop("staged")
    timings["evaluate_and_write"] = {"seconds": time.perf_counter() - start, "reused": False}
    summary["timings"] = timings
    summary["total_seconds"] = time.perf_counter() - total_start
    atomic_write_text(partial_path(model_dir) / "run_summary.json", json.dumps(summary, indent=2, default=str))
    switch_folders(work / RELEASE_JOURNAL, staged, release_id=summary["release_id"])
    print_summary(summary, model_dir)
    return summary


def print_summary(summary: dict, model_dir: Path) -> None:
    lines = ["", "=" * 72, f"CalM main job finished: {model_dir}", "-" * 72]
    for name, timing in summary["timings"].items():
        note = " (reused)" if timing.get("reused") else ""
        lines.append(f"  {name:<22} {timing['seconds']:8.1f} s{note}")
    stage_sum = sum(timing["seconds"] for timing in summary["timings"].values())
    lines.append(f"  {'all stages':<22} {stage_sum:8.1f} s   (this invocation: {summary['total_seconds']:.1f} s)")
    lines.append("-" * 72)
    for name, value in summary["metrics"].items():
        if isinstance(value, float):
            lines.append(f"  {name:<40} {value:.4f}")
    # the folder as the user can type it from where they are: relative when it is below the working directory
    try:
        shown = str(model_dir.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        shown = str(model_dir.resolve())
    if not Path(shown).is_absolute() and "/" not in shown:
        shown = f"./{shown}"  # a bare name would be taken for a Hub repo id when the folder is missing
    lines += [
        "-" * 72,
        "Try it:",
        f'  from transformers import AutoModel; AutoModel.from_pretrained("{shown}")',
        f'  from transformers import pipeline; import calm_hf; pipeline("neural-forecasting", model="{shown}")',
        f"  calm forecast --model {shown} --traces your_recording.npz --horizon 20 --plot forecast.png",
        "=" * 72,
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
