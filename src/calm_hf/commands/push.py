"""`calm push`: upload a checkpoint folder (and its tokenized dataset) to the Hugging Face Hub.

    calm push --model_dir calm-base --repo_id you/calm-base --dataset_dir calm-base-dataset
    calm push calm-base you/calm-base             # the positional form works too
    calm push --model_dir calm-base --stage_only  # copy what would be uploaded into --staging_dir, upload nothing

Needs a write token (HF_TOKEN or `hf auth login`); HF_ENDPOINT selects another Hub.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from ..hub import CalmHubError, push_to_hub, stage_for_upload
from . import parse_command_args, run_command


@dataclass
class PushArguments:
    model_dir: str | None = field(default=None, metadata={"help": "Checkpoint folder, e.g. calm-base/."})
    repo_id: str | None = field(
        default=None, metadata={"help": "Model repository, namespace/name (a bare name goes under your user)."}
    )
    dataset_dir: str | None = field(default=None, metadata={"help": "Tokenized dataset folder (save_to_disk)."})
    dataset_repo_id: str | None = field(default=None, metadata={"help": "Dataset repository (default: <repo_id>-dataset)."})
    token: str | None = field(default=None, metadata={"help": "Write token (default: HF_TOKEN or the saved login)."})
    private: bool = field(default=False, metadata={"help": "Create the repositories as private."})
    commit_message: str | None = field(default=None, metadata={"help": "Message of the model commit."})
    stage_only: bool = field(default=False, metadata={"help": "Only copy what would be uploaded into --staging_dir."})
    staging_dir: str = field(default="hub_uploads/staging", metadata={"help": "Staging root of --stage_only."})


def legacy_argv(argv: list[str]) -> list[str]:
    """Older spellings in today's form: up to two leading positionals (model folder, repository) become
    --model_dir / --repo_id, and --kebab-case flags become --snake_case."""
    argv = ["--" + item[2:].replace("-", "_") if item.startswith("--") and "=" not in item else item for item in argv]
    positionals = []
    while argv and not argv[0].startswith("-") and len(positionals) < 2:
        positionals.append(argv.pop(0))
    return [*(f for name, value in zip(("--model_dir", "--repo_id"), positionals) for f in (name, value)), *argv]


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` (see `PushArguments`), push (or stage) and print the result as JSON. Returns the exit code."""
    argv = legacy_argv(list(sys.argv[1:] if argv is None else argv))
    (args,) = parse_command_args((PushArguments,), argv, prog="calm push")
    if args.model_dir is None or (args.repo_id is None and not args.stage_only):
        print("calm push: give the checkpoint folder and the repository: --model_dir calm-base --repo_id you/calm-base",
              file=sys.stderr)
        return 2
    try:
        if args.stage_only:
            print(json.dumps({"staged": str(stage_for_upload(args.model_dir, args.staging_dir))}))
            return 0
        result = push_to_hub(args.model_dir, args.repo_id, dataset_dir=args.dataset_dir,
                             dataset_repo_id=args.dataset_repo_id, token=args.token, private=args.private,
                             commit_message=args.commit_message)
    except CalmHubError as error:
        print(f"calm push: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-push` (and `calm push`): returns the exit code."""
    return run_command("push", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
