"""Resolve a checkpoint source to a local folder: Hugging Face hub repo, `s3://` prefix or local path.

- A local folder is used in place (no copy); it must hold a config.json.
- A hub repo id goes through `huggingface_hub.snapshot_download` into `<cache_dir>/hub` (the hub's
  own cache layout, so `cache_dir` can simply be `$HF_HOME`); `HF_HUB_OFFLINE=1` reads that cache
  only, and `HF_TOKEN` is the default token.
- An `s3://bucket/prefix` is mirrored into `<cache_dir>/s3/<bucket>/<prefix>`, resumably and
  verified against the objects' ETags (`s3_download`).
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

from tqdm import tqdm

from slime_wf.checkpoint import CheckpointError
from slime_wf.checkpoint.s3_download import MANIFEST_NAME, DownloadReport, download_s3

__all__ = ["CheckpointError", "DownloadReport", "MANIFEST_NAME", "download_s3", "resolve_checkpoint"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_checkpoint(
    source: str,
    cache_dir: str,
    *,
    revision: str | None = None,
    allow_patterns: list[str] | str | None = None,
    token: str | None = None,
    max_workers: int = 8,
    progress: bool = True,
) -> str:
    """A local folder holding checkpoint `source` (local path, `s3://bucket/prefix` or hub repo id)."""
    if not source:
        raise CheckpointError(
            "checkpoint source is empty: give a local path, s3://bucket/prefix or a hub repo id"
        )
    if source.startswith("s3://"):
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to hub repos, not to {source}")
        return download_s3(
            source, cache_dir, allow_patterns=allow_patterns, max_workers=max_workers, progress=progress
        ).local_dir
    local = os.path.expanduser(source.removeprefix("file://"))
    if os.path.exists(local) or source.startswith(("/", ".", "~", "file://")):
        return _resolve_local(local)
    if _REPO_ID.match(source):
        return _resolve_hub(source, cache_dir, revision, allow_patterns, token, max_workers, progress)
    raise CheckpointError(
        f"checkpoint source {source!r} is neither an existing local folder, an s3://bucket/prefix URI nor a "
        "Hugging Face repo id like 'Qwen/Qwen3-0.6B'"
    )


def _resolve_local(path: str) -> str:
    if not os.path.isdir(path):
        raise CheckpointError(f"local checkpoint {path} does not exist or is not a folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(
            f"local checkpoint {path} has no config.json: point at a Hugging Face checkpoint folder"
        )
    return os.path.abspath(path)


# ---- Hugging Face hub ---------------------------------------------------------------------------


def _resolve_hub(repo_id, cache_dir, revision, allow_patterns, token, max_workers, progress) -> str:
    import huggingface_hub
    from huggingface_hub import errors

    hub_cache = os.path.join(cache_dir, "hub")
    offline = _env_true("HF_HUB_OFFLINE") or bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    what = f"Hugging Face repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    kwargs: dict[str, Any] = dict(
        repo_id=repo_id,
        revision=revision,
        cache_dir=hub_cache,
        allow_patterns=allow_patterns,
        token=token or os.environ.get("HF_TOKEN") or None,
        max_workers=max_workers,
        local_files_only=offline,
        endpoint=os.environ.get("HF_ENDPOINT") or None,
    )
    if not progress:
        kwargs["tqdm_class"] = _SilentTqdm
    try:
        return huggingface_hub.snapshot_download(**kwargs)
    except errors.GatedRepoError as err:
        raise CheckpointError(
            f"{what} is gated: accept its terms on huggingface.co and set HF_TOKEN ({err})"
        ) from err
    except errors.RepositoryNotFoundError as err:
        raise CheckpointError(
            f"{what} was not found on the hub; check the id, or set HF_TOKEN if it is private"
        ) from err
    except errors.RevisionNotFoundError as err:
        raise CheckpointError(f"{what}: the revision does not exist on the hub") from err
    except errors.LocalEntryNotFoundError as err:
        if offline:
            raise CheckpointError(
                f"{what} is not in the cache {hub_cache} and HF_HUB_OFFLINE is set: download it where the hub is "
                f"reachable (`huggingface-cli download {repo_id} --cache-dir {hub_cache}`), unset HF_HUB_OFFLINE, "
                "or give a local path or s3:// URI instead (a revision must be a full 40-character commit hash "
                "or a branch already in the cache)"
            ) from err
        raise CheckpointError(
            f"{what} could not be fetched (the hub is unreachable: {err.__cause__ or err}) and is not in the "
            f"cache {hub_cache}; check the network or HF_ENDPOINT, or give a local path or s3:// URI"
        ) from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left in {hub_cache} while downloading {what}; free space"
            ) from err
        raise


class _SilentTqdm(tqdm):
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
