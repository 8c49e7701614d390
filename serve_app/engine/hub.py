"""Fetching checkpoint pieces from the Hugging Face hub: once into CACHE_DIR, with progress, offline after.

The first start of a hub MODEL_ID downloads ~6 GB. While it runs, `DownloadProgress` holds bytes done and
total per file: the model replica's /health reports it and the log gets a line every few seconds, so a user
can tell a slow download from a hung server. Without the network (or with HF_HUB_OFFLINE=1) an uncached
repo is an expected failure, answered with what to do instead, never with the hub client's traceback.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import ModelLoadError
from serve_app.engine.options import EngineOptions

logger = logging.getLogger(LOGGER_NAME)

LOG_EVERY_S = 5.0
# What the hub client raises when it cannot reach the hub at all (httpx2's, its own offline mode, sockets').
_UNREACHABLE = (
    "ConnectError",
    "ConnectTimeout",
    "TimeoutException",
    "ReadTimeout",
    "OfflineModeIsEnabled",
    "gaierror",
    "ConnectionError",
    "ConnectionRefusedError",
    "TimeoutError",
)


class DownloadProgress:
    """Bytes done and total per file of the current download; written by download threads, read anywhere."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, list[int]] = {}  # "repo/file" -> [done, total]
        self._last_log = 0.0
        self.active = False

    def start(self, repo_id: str, sizes: dict[str, Optional[int]]) -> None:
        with self._lock:
            for name, size in sizes.items():
                self._files[f"{repo_id}/{name}"] = [0, int(size or 0)]
            self.active = True

    def finish(self) -> None:
        with self._lock:
            self.active = False

    def advance(self, key: str, n: int) -> None:
        with self._lock:
            entry = self._files.setdefault(key, [0, 0])
            entry[0] += int(n)
            now = time.monotonic()
            due = now - self._last_log >= LOG_EVERY_S
            if due:
                self._last_log = now
        if due:
            report = self.report()
            logger.info(
                "downloading: %.2f of %.2f GB (%s%%)",
                report["done_bytes"] / 1e9,
                report["total_bytes"] / 1e9,
                report["percent"],
            )

    def report(self) -> dict:
        """{done_bytes, total_bytes, percent, files: [{file, done_bytes, total_bytes}]} for /health."""
        with self._lock:
            files = [
                {"file": key, "done_bytes": done, "total_bytes": total} for key, (done, total) in self._files.items()
            ]
        done = sum(f["done_bytes"] for f in files)
        total = sum(f["total_bytes"] for f in files)
        return {
            "done_bytes": done,
            "total_bytes": total,
            "percent": round(100 * done / total, 1) if total else None,
            "files": files,
        }

    def bar(self, key: str) -> type:
        """A progress-bar class for huggingface_hub's `tqdm_class` that feeds this file's counts."""
        progress = self

        class _Bar:
            # The shape huggingface_hub drives (cf. its own aggregating bar): bytes written go to `update`;
            # network bytes (`update_transfer`) are the same bytes or compressed ones, and are not counted.
            def __init__(self, *args, **kwargs):
                if kwargs.get("initial"):
                    progress.advance(key, kwargs["initial"])

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                progress.advance(key, n or 0)

            def __getattr__(self, name):  # close, refresh, set_postfix_str, update_transfer, ...
                return lambda *args, **kwargs: None

        return _Bar


def offline_message(repo_id: str, options: EngineOptions, reason: str) -> str:
    return (
        f"cannot download {repo_id} from the Hugging Face hub ({reason}). The first start needs the network "
        f"once (about 6 GB for the full model); later starts load offline from {options.cache_dir / 'hub'}. "
        f"Or set MODEL_ID to a local CSM checkpoint folder. To try the server offline with a tiny random-weight "
        f"checkpoint, run in the checkout: ./ops/serve.sh --tiny /tmp/csm-tiny"
    )


def _causes(exc: Optional[BaseException]) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 10 and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _diagnose(exc: BaseException) -> tuple[bool, BaseException]:
    """(whether the hub was unreachable, the error worth reporting). An HTTP answer from the hub (404,
    401, gated) means it was reached, whatever the outer error's wording."""
    from huggingface_hub.errors import HfHubHTTPError

    chain = _causes(exc)
    answered = next((e for e in chain if isinstance(e, HfHubHTTPError)), None)
    if answered is not None:
        return False, answered
    unreachable = any(cls.__name__ in _UNREACHABLE for error in chain for cls in type(error).__mro__)
    return unreachable, exc


def fetch_repo(
    repo_id: str, options: EngineOptions, patterns: list[str], progress: Optional[DownloadProgress] = None
) -> Path:
    """A snapshot of `repo_id` in CACHE_DIR: from the cache when present, else downloaded once."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = dict(
        cache_dir=options.cache_dir / "hub",
        endpoint=options.hf_endpoint,
        token=options.hf_token.get_secret_value() if options.hf_token else None,
    )
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns, **kwargs))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError(offline_message(repo_id, options, "HF_HUB_OFFLINE is set and it is not cached"))
    progress = progress or DownloadProgress()
    logger.info("downloading %s into %s (first run only)", repo_id, options.cache_dir / "hub")
    try:
        plan = snapshot_download(repo_id, allow_patterns=patterns, dry_run=True, **kwargs)
        todo = [f for f in plan if f.will_download]
        progress.start(repo_id, {f.filename: f.file_size for f in todo})
        for f in todo:
            hf_hub_download(
                repo_id,
                f.filename,
                revision=f.commit_hash,
                tqdm_class=progress.bar(f"{repo_id}/{f.filename}"),
                **kwargs,
            )
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
    except Exception as exc:  # the hub's errors are many; the message is what matters here
        unreachable, exc = _diagnose(exc)
        if unreachable:
            raise ModelLoadError(offline_message(repo_id, options, "the hub cannot be reached")) from None
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        gated = any(s in str(exc).lower() for s in ("401", "403", "gated"))
        hint = " (gated repo: accept its licence on the hub and set HF_TOKEN)" if gated else ""
        raise ModelLoadError(f"cannot download {repo_id}: {type(exc).__name__}: {text}{hint}") from None
    finally:
        progress.finish()
    logger.info("downloaded %s", repo_id)
    return path
