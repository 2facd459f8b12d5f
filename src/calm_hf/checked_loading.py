"""Weight checksums and checked loading, shared by the tokenizer and the dual-axis transformer: checksums written at
save time and verified at load time, local folders and layer mismatches named clearly, and the tokenizer-model
pairing checked by fingerprint.

Both modeling files import this module relatively, so `save_pretrained` copies it next to the weights with the
remote code (as it copies `presets.py` for the configurations) and a checkpoint still loads with
`trust_remote_code=True` on a machine without calm_hf. It imports only the standard library.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable


WEIGHT_CHECKSUMS = "checksums.sha256"
# a key inside a numbered layer, e.g. "model.layers.3.mlp.up_proj.weight" -> group 1 "model.layers.3"
LAYER_KEY = re.compile(r"((?:^|[\w.]*\.)layers\.\d+)\.")


def _sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_weight_checksums(save_directory) -> None:
    """Record the sha256 of every weights file in `<save_directory>/checksums.sha256` (the `sha256sum` format, so
    `sha256sum -c checksums.sha256` checks a copy by hand); `load_checked_pretrained` verifies it on load."""
    names = sorted(name for name in os.listdir(save_directory) if name.endswith(".safetensors"))
    lines = [f"{_sha256_of_file(os.path.join(save_directory, name))}  {name}\n" for name in names]
    staging = os.path.join(save_directory, WEIGHT_CHECKSUMS + ".partial")
    with open(staging, "w") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, os.path.join(save_directory, WEIGHT_CHECKSUMS))


def verify_weight_checksums(folder: str) -> None:
    """Raise a ValueError naming the file when a weights file differs from the hash recorded at save time (bit
    flips, a partial copy that still parses). Folders saved without checksums are not checked."""
    record = os.path.join(folder, WEIGHT_CHECKSUMS)
    if not os.path.isfile(record):
        return
    with open(record) as handle:
        entries = [line.strip().split(None, 1) for line in handle if line.strip()]
    for entry in entries:
        if len(entry) != 2:
            raise ValueError(f"{record} is garbled (line {' '.join(entry)!r}); re-save the checkpoint.")
        expected, name = entry[0], entry[1].lstrip("*")
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue  # a missing file gets transformers' own error
        actual = _sha256_of_file(path)
        if actual != expected:
            raise ValueError(
                f"{path} does not match the sha256 recorded when it was saved ({record}): expected {expected}, "
                f"got {actual}. The file is corrupt (bit flips or an incomplete copy): copy or download it again. (If you "
                "replaced the weights on purpose without save_pretrained, delete checksums.sha256 or re-save.)"
            )


def local_checkpoint_folder(pretrained_model_name_or_path, subfolder: str | None) -> str | None:
    """The folder a local path points to (None for a hub id); a local path that does not exist is a FileNotFoundError
    naming it, instead of the hub's "Repo id must be in the form ..." error."""
    if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        return None
    path = os.path.expanduser(os.fspath(pretrained_model_name_or_path))
    parent = os.path.dirname(path)
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.isdir(path) or (parent and os.path.isdir(parent))
    if not looks_local:
        return None
    folder = os.path.join(path, subfolder or "")
    if not os.path.isdir(folder):
        hint = ""
        if os.path.basename(os.path.normpath(folder)) == "tokenizer":
            hint = (
                " A CalM checkpoint keeps its CalmTokenizer in a `tokenizer/` subfolder (written by pretraining "
                "and by the main job); point to the tokenizer folder you trained, or re-save the checkpoint."
            )
        raise FileNotFoundError(f"No checkpoint folder at {folder}.{hint}")
    return folder


def check_loaded_layers(pretrained_model_name_or_path, info: dict) -> None:
    """Layers that `config.json` declares but the weights lack (or the reverse) are an error, not freshly initialised
    (or silently dropped) layers."""
    missing = sorted({match.group(1) for key in info.get("missing_keys", []) if (match := LAYER_KEY.search(key))})
    extra = sorted({match.group(1) for key in info.get("unexpected_keys", []) if (match := LAYER_KEY.search(key))})
    if missing or extra:
        raise ValueError(
            f"config.json of {pretrained_model_name_or_path} does not match its weights: layers in the config but "
            f"not in the weights: {missing or 'none'}; layers in the weights but not in the config: {extra or 'none'}. "
            "Loading would leave randomly initialised (or dropped) layers; fix num_hidden_layers (or the encoder/decoder "
            "layer counts) in config.json to match the weights."
        )


def load_checked_pretrained(load: Callable, pretrained_model_name_or_path, args: tuple, kwargs: dict):
    """`PreTrainedModel.from_pretrained` with the checks a user needs to trust what loaded: a missing local folder
    (e.g. a checkpoint without its `tokenizer/` subfolder) is a FileNotFoundError naming it; weights that differ
    from their recorded checksums, or a truncated or garbled safetensors file, are an error naming the file; and
    layers that `config.json` and the weights disagree on are an error (`check_loaded_layers`)."""
    kwargs = dict(kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    folder = local_checkpoint_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
    if folder is not None:
        verify_weight_checksums(folder)
    try:
        model, info = load(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
    except Exception as error:
        if "safetensor" not in type(error).__name__.lower() and "deserializ" not in str(error).lower():
            raise
        where = os.path.join(folder, "model.safetensors") if folder else f"the weights of {pretrained_model_name_or_path}"
        raise ValueError(
            f"{where} is truncated or corrupt and cannot be read ({type(error).__name__}: {error}); copy or download "
            "the checkpoint again, or re-save it with save_pretrained."
        ) from error
    check_loaded_layers(pretrained_model_name_or_path, info)
    return (model, info) if want_info else model


def check_tokenizer_fingerprint(model, tokenizer) -> None:
    """Refuse a tokenizer (a `CalmTokenizer`) that is not the one `model` (a CalM dual-axis transformer) was
    pretrained with.

    The DAT's config records `tokenizer_fingerprint` (see `CalmTokenizer.fingerprint`) at pretraining; checkpoints
    saved before it existed carry None and are not checked.

    Raises:
        `ValueError`: naming both fingerprints and where the right tokenizer lives.
    """
    expected = getattr(model.config, "tokenizer_fingerprint", None)
    if expected is None:
        return
    actual = tokenizer.fingerprint()
    if actual != expected:
        source = getattr(tokenizer.config, "_name_or_path", "")
        raise ValueError(
            f"The tokenizer{f' loaded from {source}' if source else ''} has fingerprint {actual} but the model was pretrained with the tokenizer of "
            f"fingerprint {expected} (config.tokenizer_fingerprint): its codes would mean different things to the "
            "model. Load the tokenizer saved with this checkpoint (its `tokenizer/` subfolder), or retokenize and "
            "pretrain with this one."
        )


__all__ = [
    "WEIGHT_CHECKSUMS",
    "check_tokenizer_fingerprint",
    "load_checked_pretrained",
    "verify_weight_checksums",
    "write_weight_checksums",
]
