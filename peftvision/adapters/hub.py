"""Adapters on the Hugging Face Hub: `hf:USER/NAME[@REVISION]` wherever a directory is accepted, and `push`.

Downloads go through huggingface_hub's own cache (`snapshot_download`), so an adapter fetched once
loads offline afterwards, and `HF_HUB_OFFLINE=1` is honoured. Every hub failure becomes one
`PeftVisionError` line saying what to do; nothing here runs unless a source starts with `hf:`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import AdapterFileError, ConfigError, PeftVisionError
from .format import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_adapter_config,
    read_adapter_tensors,
)

PREFIX = "hf:"
# what a pushed adapter directory holds; not checkpoint/ (the full training state) nor log.jsonl
PUSH_FILES = ("adapter_config.json", "adapter.safetensors", "README.md", "metrics.json", "history.csv",
              "curves.png", "config.yaml")


def is_hub_source(source: str | os.PathLike) -> bool:
    return os.fspath(source).startswith(PREFIX)


def parse_source(source: str | os.PathLike) -> tuple[str, str | None]:
    """`hf:USER/NAME[@REVISION]` -> (repo id, revision or None), the repo id checked as the hub would."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo, _, revision = os.fspath(source)[len(PREFIX):].partition("@")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise AdapterFileError(
            f"bad hub adapter {os.fspath(source)!r}: {_first_line(e)} (write hf:USER/NAME or hf:USER/NAME@REVISION)"
        ) from None
    return repo, revision or None


def resolve_adapter(source: str | os.PathLike) -> Path:
    """The local directory of an adapter: `source` itself, or the hub cache's snapshot of `hf:...`.

    Only the adapter's own files and its card are downloaded (not training curves or logs)."""
    if not is_hub_source(source):
        return Path(source)
    from huggingface_hub import snapshot_download

    repo, revision = parse_source(source)
    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]))
    except Exception as e:  # noqa: BLE001 -- every hub failure is the user's to fix; _download_error sorts them
        raise _download_error(os.fspath(source), repo, revision, e) from None
    if not (path / CONFIG_NAME).is_file():
        raise AdapterFileError(
            f"{os.fspath(source)} holds no peftvision adapter (no {CONFIG_NAME} at that revision); "
            f"upload one with `peftvision push --adapter DIR --repo {repo}`"
        )
    return path


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP client this huggingface_hub uses (httpx2 in 2.x, httpx or
    requests before), so the message is right on every supported version."""
    errors: list[type[BaseException]] = []
    for module, names in (("httpx2", ("ConnectError", "TimeoutException")), ("httpx", ("ConnectError", "TimeoutException")),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        errors += [getattr(imported, n) for n in names if hasattr(imported, n)]
    return tuple(errors)


def _hub_errors(*names: str) -> tuple[type[BaseException], ...]:
    """huggingface_hub's error classes of these names that this version has (some are recent)."""
    from huggingface_hub import errors

    return tuple(getattr(errors, n) for n in names if hasattr(errors, n))


def _download_error(source: str, repo: str, revision: str | None, e: Exception) -> PeftVisionError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, HFValidationError):
        return AdapterFileError(f"bad hub adapter {source!r}: {_first_line(e)}")
    offline = (LocalEntryNotFoundError, *_hub_errors("IncompleteSnapshotError", "OfflineModeIsEnabled"), *_network_errors())
    if isinstance(e, offline):
        rev = f" --revision {revision}" if revision else ""
        return AdapterFileError(
            f"{source} is not in the local hub cache and the hub is unreachable (offline / HF_HUB_OFFLINE=1): "
            f"connect once, or download it with `hf download {repo}{rev}`"
        )
    if isinstance(e, GatedRepoError):
        return AdapterFileError(f"{repo} is gated: accept its conditions on its hub page, then {login}")
    if isinstance(e, RevisionNotFoundError):
        return AdapterFileError(f"{repo} has no revision {revision!r} (a branch, tag or commit)")
    if isinstance(e, RepositoryNotFoundError) or (isinstance(e, HfHubHTTPError) and _status(e) == 401):
        return AdapterFileError(f"no hub repo {repo} (or it is private: {login})")
    if isinstance(e, (HfHubHTTPError, OSError)):
        return AdapterFileError(f"cannot download {source}: {_first_line(e)}")
    raise e


# ----------------------------------------------------------------------------- push

def push(
    directory: str | os.PathLike,
    repo: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: Any = None,
) -> str:
    """Upload an adapter directory to the hub model repo `repo` (created if needed); returns its URL.

    The directory is checked first (config and tensors load), and gets a model card if it has none.

    Args:
        directory: a directory written by `save_adapter` / `finetune`.
        repo: USER/NAME (or ORG/NAME) on the hub.
        private: create the repo private (an existing repo keeps its visibility).
        revision: a branch to push to (created from main if missing); default main.
        commit_message: default "Upload <method> adapter for <model>".
        token: a hub token; default the logged-in one (`hf auth login`, HF_TOKEN).
        api: an `HfApi` to use (tests pass a recording one).
    """
    from .card import read_metrics, set_card_repo, write_card

    if is_hub_source(directory):
        raise ConfigError(f"push uploads a local adapter directory, not {os.fspath(directory)}")
    path = Path(directory)
    config = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    if set(tensors) != set(config["tensors"]):
        raise AdapterFileError(f"{path / WEIGHTS_NAME} does not hold the tensors {path}/adapter_config.json lists")
    check_repo_name(repo)
    if not (path / CARD_NAME).exists():
        write_card(path, metrics=read_metrics(path))
    set_card_repo(path, repo)
    api = connect(token, api)
    message = commit_message or f"Upload {config['method']} adapter for {config['model']['name']}"
    return upload(api, path, repo, message, files=PUSH_FILES, private=private, revision=revision)


def check_repo_name(repo: str) -> None:
    """One line for a repo name the hub would refuse, before any work is done for it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise ConfigError(f"bad hub repo name {repo!r}: {_first_line(e)} (write USER/NAME)") from None


def connect(token: str | None = None, api: Any = None) -> Any:
    """An `HfApi` to push with, or one line saying why there is none (offline, not logged in)."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.is_offline_mode():
        raise PeftVisionError("the hub is unreachable (HF_HUB_OFFLINE=1): unset it to push")
    token = token or get_token()
    if api is None and token is None:
        raise PeftVisionError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN")
    return api or HfApi(token=token)


def upload(
    api: Any,
    path: str | os.PathLike,
    repo: str,
    commit_message: str,
    files: Sequence[str] | None = None,
    private: bool = False,
    revision: str | None = None,
) -> str:
    """Create the model repo `repo` if needed and upload `files` of the folder `path` (all of it when
    None) in one commit, to `revision` (a branch, created from main if missing); returns the URL."""
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(url, "repo_id", None) or repo
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id, folder_path=str(path), repo_type="model", revision=revision,
            commit_message=commit_message, allow_patterns=list(files) if files is not None else None,
        )
    except Exception as e:  # noqa: BLE001 -- sorted by _push_error; a bug keeps its traceback there
        raise _push_error(repo, e) from None
    return f"{url}" + (f"/tree/{revision}" if revision else "")


def _push_error(repo: str, e: Exception) -> PeftVisionError:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    if isinstance(e, _hub_errors("LocalTokenNotFoundError")) or (isinstance(e, HfHubHTTPError) and _status(e) == 401):
        return PeftVisionError("not logged in to the Hugging Face Hub (or the token is invalid): run `hf auth login`")
    if isinstance(e, HfHubHTTPError) and _status(e) == 403:
        return PeftVisionError(f"your token may not write to {repo}: use a write token, or a repo of your own")
    if isinstance(e, (*_hub_errors("OfflineModeIsEnabled"), *_network_errors())):
        return PeftVisionError(f"the hub is unreachable (offline?): cannot push to {repo}")
    if isinstance(e, HFValidationError):
        return ConfigError(f"bad hub repo name {repo!r}: {_first_line(e)}")
    if isinstance(e, (HfHubHTTPError, OSError)):
        return PeftVisionError(f"push to {repo} failed: {_first_line(e)}")
    raise e


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
