"""Push a CalM checkpoint folder (and its tokenized dataset) to the Hugging Face Hub.

    calm push --model_dir calm-base --repo_id me/calm-base --dataset_dir calm-base-dataset --dataset_repo_id me/calm-base-dataset

(the command is `calm_hf.commands.push`; this module is the library it calls)

```python
>>> from calm_hf.hub import push_to_hub
>>> push_to_hub("calm-base", "me/calm-base", dataset_dir="calm-base-dataset")
{'model_repo_id': 'me/calm-base', 'model_url': 'https://huggingface.co/me/calm-base', ...}
```

Pushing is idempotent: repositories are created with `exist_ok=True`, unchanged files are skipped by the Hub client,
and pushing the same folder twice leaves the same files. Every failure a user can fix (offline mode, no token, a wrong
token, an unreachable endpoint, a missing folder) raises `CalmHubError` with the fix in its message.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .atomic import claim_output_folder

__all__ = ["CalmHubError", "DEFAULT_IGNORE_PATTERNS", "push_to_hub", "stage_for_upload"]

# Training leftovers that must not be uploaded with a checkpoint.
DEFAULT_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    "runs/**",
    "**/__pycache__/**",
    "*.pyc",
    ".calm_stage.json",
    ".calm_output.json",
    "**/.calm_output.json",
    "**/.calm_stage.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "*.tmp",
    ".DS_Store",
]

_LOGIN_FIX = "log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN=<a write token>"


class CalmHubError(RuntimeError, ValueError):
    """A push to the Hub failed for a reason the user can fix; the message names the fix."""


def _offline_mode() -> bool:
    from huggingface_hub import constants

    env_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env_offline or bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _connection_error_types() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError]
    for module_name in ("httpx", "httpx2"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        errors.extend(getattr(module, name) for name in ("ConnectError", "TimeoutException", "NetworkError")
                      if hasattr(module, name))
    return tuple(errors)


def _explain(error: BaseException, what: str) -> CalmHubError:
    """Turn a Hub client exception into a CalmHubError that says how to fix it."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = _endpoint()
    if isinstance(error, OfflineModeIsEnabled):
        return CalmHubError(
            f"Cannot {what}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1). Unset it "
            "(`unset HF_HUB_OFFLINE`) to push."
        )
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 401:
            return CalmHubError(f"Cannot {what}: the Hub at {endpoint} rejected the token (401). To fix, {_LOGIN_FIX}.")
        if status == 403:
            return CalmHubError(
                f"Cannot {what}: the token has no write access to this namespace on {endpoint} (403). Use a token "
                "with the `write` role, or a repo id under your own user or an organisation you can write to."
            )
        return CalmHubError(f"Cannot {what}: the Hub at {endpoint} answered {status}: {error}")
    if isinstance(error, _connection_error_types()):
        return CalmHubError(
            f"Cannot {what}: could not reach the Hub at {endpoint} ({type(error).__name__}: {error}). Check the "
            "network connection, or set HF_ENDPOINT to a reachable Hub (e.g. a mirror) and unset HF_HUB_OFFLINE."
        )
    return CalmHubError(f"Cannot {what}: {type(error).__name__}: {error}")


def stage_for_upload(
    model_dir: str | os.PathLike, staging_dir: str | os.PathLike = "hub_uploads/staging", overwrite: bool = True
) -> Path:
    """Copy a checkpoint folder into the staging area without training leftovers, to inspect what a push uploads.

    Args:
        model_dir (`str` or `os.PathLike`): The checkpoint folder (e.g. `calm-base/`).
        staging_dir (`str` or `os.PathLike`, *optional*, defaults to `"hub_uploads/staging"`): Staging root
            (gitignored); the copy lands in `<staging_dir>/<name of model_dir>`.
        overwrite (`bool`, *optional*, defaults to `True`): Replace an existing staged copy. The checkpoint itself,
            or a folder holding it, is never replaced (`calm_hf.atomic.claim_output_folder`).

    Returns:
        `Path` of the staged copy.
    """
    import fnmatch

    source = Path(model_dir)
    if not source.is_dir():
        raise CalmHubError(f"{source} is not a folder; pass the checkpoint folder written by `calm main` "
                           "(e.g. calm-base/).")
    target = Path(staging_dir) / source.resolve().name
    try:
        claim_output_folder(target, "push", [source], overwrite=overwrite)
    except (ValueError, FileExistsError) as error:
        raise CalmHubError(str(error)) from None
    if target.exists():
        shutil.rmtree(target)
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source).as_posix()
        if path.is_dir() or any(fnmatch.fnmatch(relative, pattern) for pattern in DEFAULT_IGNORE_PATTERNS):
            continue
        if any(part.startswith("checkpoint-") or part == "__pycache__" for part in Path(relative).parts[:-1]):
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / relative)
    return target


def _merge_dataset_card(api, dataset_repo_id: str, card_path: Path, token: str | None) -> str | None:
    """Upload our dataset card, keeping the `dataset_info`/`configs` metadata that `datasets` wrote on push.

    `datasets` stores the features (e.g. `Array2D`) and split sizes in the README's YAML; replacing the README without
    them would make `load_dataset` infer plainer features from the parquet files.
    """
    from huggingface_hub import DatasetCard, hf_hub_download

    ours = DatasetCard.load(card_path)
    remote_path = hf_hub_download(dataset_repo_id, "README.md", repo_type="dataset", token=token)
    remote = DatasetCard.load(remote_path)
    metadata = ours.data.to_dict()
    for key, value in remote.data.to_dict().items():
        if key in ("dataset_info", "configs") or key not in metadata:
            metadata[key] = value
    from huggingface_hub import DatasetCardData

    merged = DatasetCard(f"---\n{DatasetCardData(**metadata).to_yaml()}\n---\n{ours.text}")
    if str(merged) == str(remote):
        return None
    info = api.upload_file(
        path_or_fileobj=str(merged).encode("utf-8"),
        path_in_repo="README.md",
        repo_id=dataset_repo_id,
        repo_type="dataset",
        commit_message="Update dataset card",
    )
    return info.oid


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    dataset_dir: str | os.PathLike | None = None,
    dataset_repo_id: str | None = None,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> dict[str, Any]:
    """Create the repositories if needed and upload a checkpoint folder and, optionally, its tokenized dataset.

    Args:
        model_dir (`str` or `os.PathLike`):
            Checkpoint folder (`config.json`, `model.safetensors`, `tokenizer/`, remote-code files, `README.md` card).
            Training leftovers (`checkpoint-*`, optimizer states, `.calm_stage.json`) are not uploaded.
        repo_id (`str`):
            Model repository, `"namespace/name"`; a bare `"name"` goes under the token's user.
        dataset_dir (`str` or `os.PathLike`, *optional*):
            A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`; pushed with
            `datasets`' `push_to_hub` (parquet shards + features in the card). A `README.md` in it (e.g. from
            `calm_hf.cards.render_dataset_card`) becomes the dataset card.
        dataset_repo_id (`str`, *optional*):
            Dataset repository; defaults to `"<repo_id>-dataset"`.
        token (`str`, *optional*):
            Write token; defaults to `HF_TOKEN` or the token saved by `hf auth login`.
        private (`bool`, *optional*, defaults to `False`):
            Create the repositories as private (existing repositories keep their visibility).
        commit_message (`str`, *optional*):
            Message of the model commit.

    Returns:
        `dict` with `model_repo_id`, `model_url`, `model_commit` and, with a dataset, `dataset_repo_id`, `dataset_url`,
        `dataset_commit`.

    Raises:
        `CalmHubError`: offline mode, no or invalid token, unreachable endpoint, missing folders; the message names the fix.
    """
    model_dir = Path(model_dir)
    _check_push_inputs(model_dir, dataset_dir)
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise CalmHubError(f"Cannot push: no Hugging Face token found. To fix, {_LOGIN_FIX}.")
    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
    except Exception as error:  # noqa: BLE001 - every failure is explained to the user
        raise _explain(error, "check the token") from error
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    dataset_repo_id = dataset_repo_id or f"{repo_id}-dataset"
    if "/" not in dataset_repo_id:
        dataset_repo_id = f"{user}/{dataset_repo_id}"

    result: dict[str, Any] = {"model_repo_id": repo_id}
    try:
        model_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(model_dir),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message or f"Upload CalM checkpoint from {model_dir.name}",
            ignore_patterns=DEFAULT_IGNORE_PATTERNS,
        )
        result.update(model_url=str(model_url), model_commit=commit.oid)
    except CalmHubError:
        raise
    except Exception as error:  # noqa: BLE001
        raise _explain(error, f"push the model to {repo_id}") from error
    if dataset_dir is not None:
        result.update(_push_dataset(api, Path(dataset_dir), dataset_repo_id, token, private))
    return result


def _check_push_inputs(model_dir: Path, dataset_dir: str | os.PathLike | None) -> None:
    """Refuse, with the fix, what cannot be pushed before any network call."""
    if not model_dir.is_dir():
        raise CalmHubError(f"Model folder {model_dir} does not exist; pass the checkpoint folder written by "
                           "`calm main` (e.g. calm-base/).")
    if not (model_dir / "config.json").is_file():
        raise CalmHubError(f"{model_dir} has no config.json; it is not a saved checkpoint. Save the model with "
                           "`save_pretrained` first.")
    if dataset_dir is not None and not Path(dataset_dir).is_dir():
        raise CalmHubError(f"Dataset folder {dataset_dir} does not exist; pass a folder written by `save_to_disk`.")
    if _offline_mode():
        raise CalmHubError(
            "Cannot push: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1). Unset it (`unset HF_HUB_OFFLINE`) "
            "and make sure the Hub (or the mirror in HF_ENDPOINT) is reachable."
        )


def _push_dataset(api, dataset_dir: Path, dataset_repo_id: str, token: str, private: bool) -> dict[str, Any]:
    """Push a `save_to_disk` folder as parquet shards, its session metadata sidecar and its card."""
    import datasets

    # A sharded corpus (`corpus.json`, as `calm main` releases it) goes up shard by shard, each shard a dataset
    # config named after its folder (`load_dataset(repo_id, "shard-00000")`); a plain `save_to_disk` folder goes
    # up as the default config.
    manifest_path = dataset_dir / "corpus.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        parts = [(dataset_dir / shard["path"], shard["path"]) for shard in manifest["shards"]]
    else:
        parts = [(dataset_dir, None)]
    result: dict[str, Any] = {"dataset_repo_id": dataset_repo_id}
    try:
        dataset_url = api.create_repo(dataset_repo_id, repo_type="dataset", private=private, exist_ok=True)
        for folder, config_name in parts:
            dataset = datasets.load_from_disk(str(folder))
            extra = {} if config_name is None else {"config_name": config_name, "data_dir": config_name}
            info = dataset.push_to_hub(dataset_repo_id, private=private, token=token,
                                       commit_message=f"Upload tokenized CalM dataset{' ' + config_name if config_name else ''}",
                                       **extra)
            # Session metadata (names, neuron ranges, z-score statistics) travels as the same sidecar as on disk,
            # so load_trial_corpus("namespace/name") and the commands get it back.
            sidecar = folder / "calm_sessions.json"
            if sidecar.is_file():
                target = sidecar.name if config_name is None else f"{config_name}/{sidecar.name}"
                api.upload_file(path_or_fileobj=str(sidecar), path_in_repo=target, repo_id=dataset_repo_id,
                                repo_type="dataset", commit_message="Upload calm_hf session metadata")
        if manifest_path.is_file():
            api.upload_file(path_or_fileobj=str(manifest_path), path_in_repo=manifest_path.name,
                            repo_id=dataset_repo_id, repo_type="dataset", commit_message="Upload the corpus manifest")
        card_path = dataset_dir / "README.md"
        card_commit = _merge_dataset_card(api, dataset_repo_id, card_path, token) if card_path.is_file() else None
        result.update(dataset_url=str(dataset_url), dataset_commit=card_commit or getattr(info, "oid", None))
    except Exception as error:  # noqa: BLE001
        raise _explain(error, f"push the dataset to {dataset_repo_id}") from error
    return result
