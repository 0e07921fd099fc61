"""The one door to the Hugging Face Hub: every download, snapshot and listing of the project goes through here.

Partial downloads resume (huggingface_hub does that), ``HF_ENDPOINT`` / ``endpoint=`` select a mirror, and Hub
failures become :class:`HubError` / :class:`HubUnreachable` with a message that says what to do, which the
scripts print without a traceback. Tests (and offline mirrors) replace the three functions below.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_HINT = (
    "set HF_ENDPOINT to a mirror (e.g. HF_ENDPOINT=https://hf-mirror.com python download.py), check the proxy "
    "settings (HTTPS_PROXY), or work offline with the tiny stand-ins: python download.py --tiny tiny"
)


class HubError(RuntimeError):
    """The Hub answered, but not with the file (missing repository or file, gated, no permission)."""


class HubUnreachable(HubError, ConnectionError):
    """No answer from the Hub (no network, offline mode, DNS, timeout)."""


def endpoint_or_env(endpoint: str | None) -> str | None:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


@functools.lru_cache(maxsize=8)
def _resolve_error(host: str) -> str | None:
    try:
        socket.getaddrinfo(host, 443)
        return None
    except OSError as exc:
        return str(exc)


def preflight(what: str, endpoint: str | None = None) -> None:
    """Fail at once, not after huggingface_hub's ~25 s of retries, when the Hub's host name does not resolve
    (no network). Skipped in offline mode (huggingface_hub answers at once there) and behind a proxy (the proxy
    resolves)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        return
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    host = urlparse(endpoint_or_env(endpoint) or "https://huggingface.co").hostname or "huggingface.co"
    error = _resolve_error(host)
    if error:
        raise HubUnreachable(
            f"cannot reach the Hugging Face Hub for {what} ({host}: {error}); {OFFLINE_HINT}"
        )


@contextlib.contextmanager
def hub_errors(what: str):
    """Turn huggingface_hub's and the network's exceptions about ``what`` into HubError / HubUnreachable."""
    try:
        yield
    except HubError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised as is when not a Hub failure
        from huggingface_hub import errors

        unreachable = (
            errors.LocalEntryNotFoundError,
            errors.OfflineModeIsEnabled,
            ConnectionError,
            TimeoutError,
        )
        if isinstance(exc, unreachable) or type(exc).__module__.split(".")[0] in (
            "httpx",
            "httpcore",
            "requests",
        ):
            raise HubUnreachable(
                f"cannot reach the Hugging Face Hub for {what} ({exc}); {OFFLINE_HINT}"
            ) from exc
        if isinstance(exc, errors.GatedRepoError):
            raise HubError(
                f"{what}: the repository is gated; accept its terms on the Hub and log in"
            ) from exc
        if isinstance(exc, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
            raise HubError(
                f"{what}: repository or revision not found on {endpoint_or_env(None) or 'the Hub'}"
            ) from exc
        if isinstance(exc, errors.EntryNotFoundError):
            raise HubError(f"{what}: file not found in the repository") from exc
        if isinstance(exc, errors.HfHubHTTPError):
            raise HubError(f"{what}: the Hub refused the request ({exc})") from exc
        raise


def download_file(
    repo_id: str,
    filename: str,
    local_dir,
    endpoint: str | None = None,
    repo_type: str | None = None,
    revision: str | None = None,
    token=None,
    subfolder: str | None = None,
    force: bool = False,
) -> str:
    """One file into ``local_dir`` (resumed if a partial download exists); returns its path."""
    import huggingface_hub

    what = f"{repo_id}/{subfolder + '/' if subfolder else ''}{filename}"
    preflight(what, endpoint)
    with hub_errors(what):
        return huggingface_hub.hf_hub_download(
            repo_id,
            filename,
            subfolder=subfolder,
            repo_type=repo_type,
            revision=revision,
            token=token,
            local_dir=os.fspath(local_dir),
            endpoint=endpoint_or_env(endpoint),
            force_download=force,
        )


def snapshot(repo_id: str, local_dir, allow_patterns=None, endpoint: str | None = None) -> str:
    """The files of ``repo_id`` matching ``allow_patterns`` into ``local_dir``."""
    import huggingface_hub

    preflight(repo_id, endpoint)
    with hub_errors(repo_id):
        return huggingface_hub.snapshot_download(
            repo_id,
            local_dir=os.fspath(local_dir),
            allow_patterns=list(allow_patterns or []) or None,
            endpoint=endpoint_or_env(endpoint),
        )


def list_files(
    repo_id: str, repo_type: str | None = None, endpoint: str | None = None, revision=None, token=None
) -> list[str]:
    import huggingface_hub

    preflight(repo_id, endpoint)
    with hub_errors(repo_id):
        api = huggingface_hub.HfApi(endpoint=endpoint_or_env(endpoint), token=token)
        return api.list_repo_files(repo_id, repo_type=repo_type, revision=revision)
