"""`import calm_hf` and the `calm` console are light (no torch, no transformers' models), yet the models are
registered with the Auto classes and the pipeline tasks whenever transformers is used next to calm_hf, whatever was
imported first. Each case runs in a fresh Python, since one import order per process is all a test can see."""

import subprocess
import sys
import textwrap

import pytest

import calm_hf

HEAVY = ("torch", "transformers.models.auto", "calm_hf.modeling_calm")


def run_python(script: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_calm_help_imports_neither_torch_nor_transformers():
    out = run_python(
        """
        import contextlib, io, sys
        from calm_hf.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as text:
            assert main(["--help"]) == 0
        assert "calm forecast" in text.getvalue()
        print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
        """
    )
    assert out.strip() == "[]"


def test_calm_forecast_help_does_not_import_torch():
    out = run_python(
        """
        import contextlib, io, sys
        from calm_hf.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as text:
            try:
                main(["forecast", "--help"])
            except SystemExit as exit:
                assert exit.code == 0, exit.code
        assert "--sampling_rate" in text.getvalue()
        print(sorted(name for name in %r if name in sys.modules))
        """ % (HEAVY,)
    )
    assert out.strip() == "[]"


@pytest.mark.parametrize("imports", [
    "import calm_hf",                                          # the README's order, reversed
    "from transformers import pipeline; import calm_hf",       # the README's order
    "from calm_hf.modeling_calm import CalmModel",             # a model module, which imports transformers itself
    "import calm_hf; import transformers.pipelines",           # the pipelines module, which imports the Auto classes
    pytest.param("import transformers; import calm_hf", marks=pytest.mark.slow),  # transformers, no Auto classes yet
    pytest.param("from calm_hf.data import load_recording", marks=pytest.mark.slow),  # a part needing no transformers
])
def test_importing_calm_hf_registers_the_models_and_tasks(imports):
    out = run_python(
        f"""
        {imports}
        import sys
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.pipelines import PIPELINE_REGISTRY
        config = AutoConfig.for_model("calm")
        print(type(config).__name__, AutoModel._model_mapping[type(config)].__name__,
              AutoModelForCausalLM._model_mapping[type(config)].__name__,
              type(AutoConfig.for_model("calm_tokenizer")).__name__)
        print(*sorted(task for task in PIPELINE_REGISTRY.get_supported_tasks() if "forecasting" in task))
        print(sum(type(finder).__name__ == "_AfterImport" for finder in sys.meta_path))
        """
    )
    assert out.splitlines() == ["CalmConfig CalmModel CalmForCausalNeuralModeling CalmTokenizerConfig",
                                "neural-forecasting time-series-forecasting", "0"]


def test_public_names_and_subpackages_are_attributes():
    for name in calm_hf.__all__:
        assert getattr(calm_hf, name) is not None
        assert name in dir(calm_hf)
    assert calm_hf.CalmModel.__module__ == "calm_hf.modeling_calm"
    assert calm_hf.data.load_recording is not None  # a subpackage, imported on first use
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        calm_hf.NoSuchThing


def test_help_into_a_closed_pipe_exits_quietly():
    """`calm --help | head -1`: the reader is gone before the help is written; no BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader has gone away
    process = subprocess.run([sys.executable, "-m", "calm_hf.cli", "--help"], stdout=write, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    os.close(write)
    assert "Error" not in process.stderr and "Traceback" not in process.stderr, process.stderr
    assert process.returncode == 141


def test_calm_prepare_runs_without_importing_torch(tmp_path):
    """Preparing trials is numpy, scipy and datasets: the command never imports torch (it starts in a fraction of
    the time), and the collators stay importable from calm_hf.data on demand."""
    import os
    import subprocess
    import sys

    script = (f"import sys; from calm_hf.commands import prepare; "
              f"prepare.run(['--output_dir', {str(tmp_path / 'trials')!r}, '--num_sessions', '1', '--num_neurons', '4', "
              f"'--num_trials', '10', '--num_steps', '40']); "
              "assert 'torch' not in sys.modules, 'calm prepare imported torch'; "
              "from calm_hf.data import CalmDataCollator; print(CalmDataCollator.__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("CalmDataCollator")
