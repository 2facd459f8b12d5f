"""Nothing lost: where every command may write, and the main job's release switching as one.

The rule (`calm_hf.atomic.claim_output_folder`): a new or empty folder, or one the same command wrote earlier, is
written; any other non-empty folder needs `--overwrite`; an input, a folder holding one, the working directory, the
home folder and their parents are never replaced. The release (`calm-base/` + `calm-base-dataset/`) is switched
through a journal, so a crash never leaves a new model beside an old dataset. The whole job under repeated SIGKILL
is the slow stress test at the end.
"""

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from calm_hf import atomic
from calm_hf.atomic import (
    OUTPUT_MARKER,
    claim_output_folder,
    finish_switch,
    mark_output,
    read_output_marker,
    switch_folders,
)
from calm_hf.cli import main as calm_main
from calm_hf.commands import main as main_command
from calm_hf.commands import prepare as prepare_command
from recording_files import smooth_traces

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def recording(tmp_path):
    """A folder holding an input recording and a notes file, as a user keeps them."""
    folder = tmp_path / "data"
    folder.mkdir()
    np.savez(folder / "rec.npz", traces=smooth_traces(5, 200), fs=np.float32(10.0))
    (folder / "notes.txt").write_text("lab notes")
    return folder


def prepare_argv(output, recording, *extra):
    return ["prepare", "--output_dir", str(output), "--npz", str(recording / "rec.npz"), "--trial_seconds", "2", *extra]


def assert_untouched(recording):
    assert (recording / "notes.txt").read_text() == "lab notes"
    assert np.load(recording / "rec.npz")["traces"].shape == (5, 200)


# ---------------------------------------------------------------------------------------------------------------------
# calm prepare: the cases that deleted data
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_into_the_folder_holding_its_input_is_refused(recording, capsys, overwrite):
    # before: exit 0, and the input .npz and the notes were deleted
    argv = prepare_argv(recording, recording, *(["--overwrite"] if overwrite else []))
    assert calm_main(argv) == 1
    err = capsys.readouterr().err
    assert "holds the input" in err and str(recording) in err and "Pass a new folder" in err
    assert_untouched(recording)


def test_prepare_into_an_unrelated_non_empty_folder_needs_overwrite(recording, tmp_path, capsys):
    other = tmp_path / "results"
    other.mkdir()
    (other / "figure.png").write_bytes(b"png")
    assert calm_main(prepare_argv(other, recording)) == 1  # before: the folder was emptied
    err = capsys.readouterr().err
    assert "FileExistsError" in err and str(other) in err and "figure.png" in err and "--overwrite" in err
    assert (other / "figure.png").read_bytes() == b"png"
    assert calm_main(prepare_argv(other, recording, "--overwrite")) == 0  # asked for: replaced whole
    assert not (other / "figure.png").exists() and (other / "dataset_dict.json").is_file()
    assert read_output_marker(other)["command"] == "prepare"
    assert_untouched(recording)


@pytest.mark.parametrize("where", [".", "..", "~"])
def test_prepare_into_the_working_directory_its_parents_or_home_is_refused(recording, tmp_path, monkeypatch, capsys,
                                                                           where):
    cwd = tmp_path / "project"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("work")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    # before: `--output_dir .` emptied the working directory, then failed with "Device or resource busy"
    assert calm_main(prepare_argv(where, recording, "--overwrite")) == 1
    err = capsys.readouterr().err
    assert ("working directory" in err) if where != "~" else ("home folder" in err)
    assert (cwd / "keep.txt").read_text() == "work"
    assert_untouched(recording)


def test_prepare_replaces_its_own_earlier_output(recording, tmp_path, caplog):
    out = tmp_path / "trials"
    first = prepare_command.run(prepare_argv(out, recording)[1:])
    with caplog.at_level("INFO"):
        second = prepare_command.run(prepare_argv(out, recording)[1:] + ["--seed", "3"])
    assert "earlier output of calm prepare" in caplog.text
    assert len(first["train"]) == len(second["train"]) and read_output_marker(out)["command"] == "prepare"
    assert not list(tmp_path.glob("*.partial"))


def test_another_commands_output_is_not_replaced_without_overwrite(recording, tmp_path):
    out = tmp_path / "tokenized"
    prepare_command.run(prepare_argv(out, recording)[1:])
    with pytest.raises(FileExistsError, match="written by `calm prepare`"):
        claim_output_folder(out, "tokenize")
    assert claim_output_folder(out, "tokenize", overwrite=True) == out.resolve()


# ---------------------------------------------------------------------------------------------------------------------
# the shared rule for the other commands
# ---------------------------------------------------------------------------------------------------------------------

def test_in_place_writers_resume_in_their_own_folder_and_never_delete(tmp_path):
    out = tmp_path / "calm"
    claim_output_folder(out, "pretrain", in_place=True)  # created and marked before training starts
    (out / "checkpoint-200").mkdir()
    claim_output_folder(out, "pretrain", [tmp_path / "data"], in_place=True)  # a resume in its own folder
    assert (out / "checkpoint-200").is_dir()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "results.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match="nothing there is deleted"):
        claim_output_folder(foreign, "pretrain", in_place=True)
    claim_output_folder(foreign, "pretrain", in_place=True, overwrite=True)
    assert (foreign / "results.csv").read_text() == "1,2" and read_output_marker(foreign)["command"] == "pretrain"


def test_a_stage_folder_of_the_main_job_takes_its_command(tmp_path):
    from calm_hf.commands.stages import Stage

    stage = Stage(tmp_path / "tokenizer", {"argv": []})
    stage.start()  # writes .calm_stage_key: the folder is not empty, yet reserved for the stage's command
    assert claim_output_folder(stage.path, "train-tokenizer", in_place=True) == stage.path.resolve()


@pytest.mark.parametrize(
    "argv",
    [
        ["train-tokenizer", "--trials_dataset", "{data}", "--output_dir", "{other}"],
        ["pretrain", "--tokenized_dataset", "{data}", "--tokenizer_path", "{data}", "--output_dir", "{other}"],
        ["adapt", "--model_path", "{data}", "--tokenized_dataset", "{data}", "--session_name", "x",
         "--output_dir", "{other}"],
        ["finetune-behavior", "--model_name_or_path", "{data}", "--tokenized_dataset", "{data}",
         "--output_dir", "{other}"],
        ["analyze", "--model", "{data}", "--dataset", "{data}", "--output_dir", "{other}"],
        ["tokenize", "--tokenizer_path", "{data}", "--trials_dataset", "{data}", "--output_dir", "{other}"],
        ["main", "--size", "tiny", "--output_dir", "{parent}", "--model_name", "other"],
        ["main", "--size", "tiny", "--output_dir", "{parent}", "--model_name", "x", "--bf16", "false"],
    ],
    ids=["train-tokenizer", "pretrain", "adapt", "finetune-behavior", "analyze", "tokenize", "main-model",
         "main-dataset"],
)
def test_every_command_refuses_a_foreign_non_empty_folder_before_working(tmp_path, capsys, argv):
    data, other = tmp_path / "data", tmp_path / "other"
    data.mkdir()
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    if "x" in argv:  # the dataset folder of a release named x
        other = other.rename(tmp_path / "x-dataset")
    argv = [a.format(data=data, other=other, parent=tmp_path) for a in argv]
    start = time.perf_counter()
    assert calm_main(argv) == 1
    err = capsys.readouterr().err
    assert "FileExistsError" in err and str(other.name) in err and "--overwrite" in err, err
    assert (other / "thesis.tex").read_text() == "years of work"
    assert time.perf_counter() - start < 30  # refused up front, not after training


def test_training_commands_refuse_to_write_into_their_inputs(tmp_path, capsys):
    data = tmp_path / "tokenized"
    data.mkdir()
    (data / "dataset_dict.json").write_text("{}")
    argv = ["pretrain", "--tokenized_dataset", str(data), "--tokenizer_path", str(data), "--output_dir", str(data),
            "--overwrite"]
    assert calm_main(argv) == 1
    assert "is the input" in capsys.readouterr().err
    assert (data / "dataset_dict.json").read_text() == "{}"


def test_forecast_never_overwrites_its_input_or_a_foreign_file(tmp_path, capsys):
    from calm_hf.commands.forecast import _save_npz, written_by_forecast

    traces = tmp_path / "traces.npz"
    np.savez(traces, traces=np.zeros((3, 40), np.float32), fs=np.float32(5.0))
    argv = ["forecast", "--model", str(tmp_path / "no-model"), "--traces", str(traces), "--horizon", "4"]
    assert calm_main(argv + ["--output", str(traces), "--overwrite"]) == 1  # before: the recording was overwritten
    assert "is the input" in capsys.readouterr().err
    foreign = tmp_path / "mine.npz"
    np.savez(foreign, x=np.ones(3))
    assert calm_main(argv + ["--output", str(foreign)]) == 1
    assert "--overwrite" in capsys.readouterr().err and np.load(foreign)["x"].sum() == 3
    assert calm_main(argv + ["--plot", str(traces)]) == 1
    ours = tmp_path / "forecast"
    _save_npz(ours, {"forecast": np.zeros((3, 4))})
    assert ours.is_file() and written_by_forecast(ours) and not written_by_forecast(foreign)


def test_push_staging_never_replaces_the_checkpoint(tmp_path):
    from calm_hf.hub import CalmHubError, stage_for_upload

    model = tmp_path / "calm-base"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(CalmHubError, match="is the input"):  # before: the checkpoint was deleted, then copied onto
        stage_for_upload(model, tmp_path)
    assert (model / "config.json").read_text() == "{}"


# ---------------------------------------------------------------------------------------------------------------------
# several folders switched as one
# ---------------------------------------------------------------------------------------------------------------------

def staged_release(tmp_path, release_id):
    pairs = []
    for name in ("calm-base", "calm-base-dataset"):
        staged = tmp_path / f"{name}.partial"
        staged.mkdir()
        (staged / "payload.txt").write_text(release_id)
        mark_output(staged, "main", release_id=release_id)
        pairs.append((staged, tmp_path / name))
    return pairs


def release_ids(tmp_path):
    return [(read_output_marker(tmp_path / name) or {}).get("release_id")
            for name in ("calm-base", "calm-base-dataset")]


def test_a_switch_interrupted_at_any_step_is_completed_by_finish_switch(tmp_path, monkeypatch):
    """Crash after each file-system step of the switch in turn; whatever is left, `finish_switch` (what the next run
    calls first) ends with both folders of one release, and before the journal exists with both of the old one."""
    journal = tmp_path / "work" / "release.json"
    journal.parent.mkdir()
    real_replace, steps = os.replace, 0

    class Killed(BaseException):
        pass

    def count_only(*args):
        nonlocal steps
        steps += 1
        return real_replace(*args)

    switch_folders(journal, staged_release(tmp_path, "old"), release_id="old")
    pairs = staged_release(tmp_path, "new0")
    monkeypatch.setattr(atomic.os, "replace", count_only)
    switch_folders(journal, pairs, release_id="new0")  # counts the steps of a switch that replaces a release
    total = steps
    assert release_ids(tmp_path) == ["new0", "new0"] and total == 5
    for crash_at in range(1, total + 1):
        calls = 0

        def crashing(*args):
            nonlocal calls
            calls += 1
            if calls == crash_at:
                raise Killed()
            return real_replace(*args)

        pairs = staged_release(tmp_path, f"new{crash_at}")
        monkeypatch.setattr(atomic.os, "replace", crashing)
        with pytest.raises(Killed):
            switch_folders(journal, pairs, release_id=f"new{crash_at}")
        monkeypatch.setattr(atomic.os, "replace", real_replace)
        committed = journal.is_file()
        before = release_ids(tmp_path)
        assert committed or before == [f"new{crash_at - 1}"] * 2, (crash_at, before)
        finish_switch(journal)
        expected = f"new{crash_at}" if committed else before[0]
        assert release_ids(tmp_path) == [expected, expected], crash_at
        for name in ("calm-base", "calm-base-dataset"):
            assert (tmp_path / name / "payload.txt").read_text() == expected
        # what the next run removes as stale; the staged folders of an uncommitted switch are among them
        atomic.remove_stale_partials(tmp_path, max_depth=1)
        if not committed:  # the crashed run's release never appeared; the next one replaces it
            switch_folders(journal, staged_release(tmp_path, f"new{crash_at}"), release_id=f"new{crash_at}")
        assert not journal.exists() and not list(tmp_path.glob("*.partial"))


def test_main_job_completes_an_interrupted_switch_before_cleaning_up(tmp_path, monkeypatch):
    """A journal left by a killed run: the next `calm main` moves the staged release into place first; its stale
    `.partial` cleanup must not delete the folders the journal still needs."""
    work = tmp_path / ".calm-base-work"
    work.mkdir()
    pairs = staged_release(tmp_path, "interrupted")
    (tmp_path / "calm-base-dataset").mkdir()
    mark_output(tmp_path / "calm-base-dataset", "main", release_id="previous")
    atomic.atomic_write_text(work / main_command.RELEASE_JOURNAL, json.dumps(
        {"moves": [[str(s), str(f)] for s, f in pairs], "release_id": "interrupted"}))
    seen = {}
    monkeypatch.setattr(main_command, "choose_dtypes", lambda args, recipe, work: {})
    monkeypatch.setattr(main_command, "run_job", lambda args, recipe, out, work: seen.update(ids=release_ids(out)))
    main_command.run(["--size", "tiny", "--output_dir", str(tmp_path)])
    assert seen["ids"] == ["interrupted", "interrupted"]
    assert not (work / main_command.RELEASE_JOURNAL).exists() and not list(tmp_path.glob("*.partial"))


# ---------------------------------------------------------------------------------------------------------------------
# the whole job under repeated SIGKILL
# ---------------------------------------------------------------------------------------------------------------------

RELEASE_FILES = ("config.json", "model.safetensors", "README.md", "eval_results.json", "run_summary.json",
                 "tokenizer/model.safetensors", OUTPUT_MARKER)


def check_release(out: Path) -> str | None:
    """The release id when `out` holds a complete, consistent release; None when it holds none yet."""
    model, dataset = out / "calm-base", out / "calm-base-dataset"
    if not model.exists() and not dataset.exists():
        return None
    for name in RELEASE_FILES:
        assert (model / name).is_file(), f"calm-base lacks {name}"
    for name in ("corpus.json", "README.md", OUTPUT_MARKER):
        assert (dataset / name).is_file(), f"calm-base-dataset lacks {name}"
    for shard in json.loads((dataset / "corpus.json").read_text())["shards"]:
        for name in ("dataset_dict.json", "calm_sessions.json"):
            assert (dataset / shard["path"] / name).is_file(), f"calm-base-dataset/{shard['path']} lacks {name}"
    ids = {read_output_marker(model)["release_id"], read_output_marker(dataset)["release_id"],
           json.loads((model / "run_summary.json").read_text())["release_id"]}
    assert len(ids) == 1, f"the release folders disagree: {ids}"
    return ids.pop()


def _main_job_child(argv: list[str], log: str) -> None:
    """A forkserver child: `calm main` with its output in `log`, exiting with the command's exit code."""
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    sys.exit(calm_main(["main", *argv]))


@pytest.mark.slow
def test_main_job_under_repeated_sigkill_always_leaves_a_whole_release(tmp_path):
    """`calm main --size tiny` SIGKILLed at random moments (20 times or more, at least 10 of them once a release exists,
    so the release switch is hit), then run to the end: after every kill, completing
    an interrupted switch (what the next run does first) leaves either no release yet or one complete release whose
    folders carry the same id, and once a release exists there is always one. Each run is forked from a server that
    imported calm_hf once, so the kills land in the job's own work, not in its imports (about 2 minutes)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["calm_hf.cli", "calm_hf.commands.main", "calm_hf.publish", __name__])
    rng = random.Random(0)
    argv = ["--size", "tiny", "--output_dir", str(tmp_path), "--bf16", "false"]
    journal = tmp_path / ".calm-base-work" / main_command.RELEASE_JOURNAL
    log = tmp_path / "run.log"
    # busy: about how long a whole run takes here; it grows while every run is killed (a loaded machine), so runs
    # eventually finish and the later kills hit the release switch
    ever, kills, kills_with_release, busy = None, 0, 0, 4.0
    while kills < 20 or kills_with_release < 10:
        assert kills < 80, "the job never finished between kills"
        process = context.Process(target=_main_job_child, args=(argv, str(log)))
        started = time.time()
        process.start()
        process.join(timeout=rng.uniform(0.0, busy))
        if process.exitcode is None:  # still working: killed at this random moment
            process.kill()
            process.join()
            kills += 1
            kills_with_release += ever is not None
            busy *= 1.2
        else:
            assert process.exitcode == 0, log.read_text()[-3000:]
            busy = 1.1 * (time.time() - started)
        if journal.exists():  # killed during the switch: the folders it still has to move are all there
            record = json.loads(journal.read_text())
            assert all(Path(staged).is_dir() or Path(final).is_dir() for staged, final in record["moves"])
        finish_switch(journal)
        current = check_release(tmp_path)
        assert current is not None or ever is None, "a release disappeared"
        ever = current or ever
    process = context.Process(target=_main_job_child, args=(argv, str(log)))
    process.start()
    process.join(timeout=600)
    assert process.exitcode == 0, log.read_text()[-3000:]
    assert check_release(tmp_path) not in (None, ever)
    assert not journal.exists() and not list(tmp_path.glob("*.partial"))
