"""Step 2 of the mix, hub datasets: a hub spec resolved to a commit and files, and its rows streamed with
`datasets` through the same seeded shuffle buffer as local files (never downloaded whole), retried within
NETWORK_RETRY_SECONDS when the connection is lost, and kept for a later run when it stays lost."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from ..cli import UserError
from ..deadline import deadline
from .reading import RANDOM_SLOTS_PER_DRAW
from .sources import GLOB_CHARS, HUB_CONFIGS, HUB_SPEC, LOCAL_SUFFIXES, Source, first_line, warn

# What the manifest records of a hub source (a work state's hub sources must have them too).
HUB_IDENTITY_KEYS = ("endpoint", "repo_id", "config", "revision", "commit_sha", "data_files", "missing_paths", "columns")
HUB_BATCH_ROWS = 1000  # hub rows made Python objects at a time (at most SHUFFLE_BUFFER; a lost stream resumes there)


@dataclass(frozen=True)
class HubSettings:
    """The stage's HUB_TIMEOUT_SECONDS and NETWORK_RETRY_SECONDS (their defaults are in defaults.py)."""

    timeout_s: float  # a hub request with no answer in this time fails
    retry_s: float  # how long a stream that lost its connection is retried before the run stops


class StreamLost(Exception):
    """A hub stream stayed unreachable for HubSettings.retry_s; the stream's state is kept for a later run."""


def _single_attempt_reads() -> None:
    """Make huggingface_hub's file reads try once: its own backoff (about 23 s per read, logged as warnings) would
    hide inside every attempt of HubRows, which retries the stream visibly within NETWORK_RETRY_SECONDS."""
    import functools

    from huggingface_hub import hf_file_system
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # also "Repo card metadata block was not found" for repos without YAML
    for name in ("http_backoff", "http_stream_backoff"):
        backoff = getattr(hf_file_system, name, None)
        if backoff is not None and not isinstance(backoff, functools.partial):
            setattr(hf_file_system, name, functools.partial(backoff, max_retries=0))


def _is_network_error(error: BaseException) -> bool:
    """A lost or refused connection, a timeout, or a hub answer that says "try later" (429, 5xx)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else 0
        return status == 429 or status >= 500
    return isinstance(error, _network_errors())


def _network_errors() -> tuple:
    import httpx
    import requests
    from datasets.utils.file_utils import CONNECTION_ERRORS_TO_RETRY

    return (ConnectionError, TimeoutError, httpx.TransportError, requests.exceptions.RequestException,
            *CONNECTION_ERRORS_TO_RETRY)


def _local_hint(source: Source) -> str:
    return (
        f"--sources {source.key}=/path/to/{source.key}.jsonl (or .json/.parquet files, a glob, or a folder that "
        f"`hf download` wrote, in the {source.schema.name} schema)"
    )


def _unreachable(source: Source, endpoint: str, error: BaseException) -> UserError:
    return UserError(
        f"{source.key}: the hub at {endpoint} did not answer for {source.spec!r} ({first_line(error)}); "
        f"set HF_ENDPOINT to a reachable mirror (e.g. HF_ENDPOINT=https://hf-mirror.com), or download the data "
        f"where the hub is reachable and point the source at the local files, e.g. {_local_hint(source)}"
    )


def _hub_files(source: Source, repo: str, sha: str, paths: str) -> tuple[list[str], list[str]]:
    """The repo files that the "+"-joined folders and globs name at commit `sha`, and the names that match nothing."""
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    base = f"datasets/{repo}@{sha}"
    files, missing = [], []
    for path in (part.strip().strip("/") for part in paths.split("+") if part.strip()):
        if GLOB_CHARS.search(path):
            found = sorted(fs.glob(f"{base}/{path}"))
        elif fs.isfile(f"{base}/{path}"):
            found = [f"{base}/{path}"]
        elif fs.isdir(f"{base}/{path}"):
            found = sorted(name for name in fs.find(f"{base}/{path}") if name.lower().endswith(LOCAL_SUFFIXES))
        else:
            found = []
        if not found:
            missing.append(path)
        files += [name[len(base) + 1 :] for name in found if name.lower().endswith(LOCAL_SUFFIXES)]
    return files, missing


def resolve_hub(source: Source, settings: HubSettings) -> dict:
    """Resolve a hub spec: its commit sha (one request bounded by the timeout, so a hanging route fails fast) and,
    for named folders or globs, the files they hold. A folder that does not exist is a warning."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    match = HUB_SPEC.fullmatch(source.spec)
    repo, revision, paths = match["repo"], match["revision"], match["paths"]
    api = HfApi()
    try:
        with deadline(settings.timeout_s):
            sha = api.dataset_info(repo, revision=revision, timeout=settings.timeout_s).sha
        if not isinstance(sha, str) or not sha:
            raise ValueError("no commit sha in the repo's info")
        with deadline(settings.timeout_s):
            files, missing = _hub_files(source, repo, sha, paths) if paths else (None, [])
    except OfflineModeIsEnabled:
        raise UserError(
            f"{source.key}: cannot stream the hub dataset {source.spec!r} while HF_HUB_OFFLINE=1; unset it, or point "
            f"the source at local files, e.g. {_local_hint(source)}"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{source.key}: the hub dataset {repo!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{source.key}: no hub dataset {repo!r} at {api.endpoint} (nor a local path {source.spec!r})"
        ) from None
    except (*_network_errors(), HfHubHTTPError) as error:  # after the not-found errors, which are HfHubHTTPErrors
        raise _unreachable(source, api.endpoint, error) from None
    except (ValueError, KeyError, TypeError) as error:  # an answer that is not the hub API's
        raise UserError(
            f"{source.key}: the hub at {api.endpoint} answered for {source.spec!r} with something that is not the "
            f"hub API ({type(error).__name__}: {first_line(error)}); check HF_ENDPOINT, or point the source at local "
            f"files, e.g. {_local_hint(source)}"
        ) from None
    for path in missing:
        warn(f"{source.key}: {repo}@{sha[:8]} has no {path}; skipped (list its folders: see the README)")
    if files == []:
        raise UserError(f"{source.key}: none of the paths in {source.spec!r} exist in {repo}@{sha[:8]}")
    return {
        "endpoint": api.endpoint, "repo_id": repo, "config": match["config"] or HUB_CONFIGS.get(repo),
        "revision": revision or "main", "commit_sha": sha, "data_files": files, "missing_paths": missing,
        "columns": list(source.schema.columns) if source.schema.columns else None,
    }


def _hub_stream(source: Source, hub: dict, settings: HubSettings):
    """The source's rows as a `datasets` stream at the resolved commit, reading only the schema's columns."""
    import datasets

    datasets.logging.set_verbosity_error()
    if "torch" not in sys.modules:  # a stream made only for mixing never meets torch, whose import costs ~2.5 CPU s
        datasets.config.TORCH_AVAILABLE = False
    # One attempt per read inside datasets (whose own retries are silent): HubRows retries, visibly and bounded.
    datasets.config.STREAMING_READ_MAX_RETRIES = 1
    datasets.config.STREAMING_READ_RETRY_INTERVAL = 0
    try:
        with deadline(settings.timeout_s):
            builder = datasets.load_dataset_builder(
                hub["repo_id"], hub["config"], revision=hub["commit_sha"], data_files=hub["data_files"]
            )
        if hub["columns"] and hasattr(builder.config, "columns"):  # Parquet reads only those columns' pages
            builder.config.columns = hub["columns"]
        else:
            hub["columns"] = None
        with deadline(settings.timeout_s):
            return builder.as_streaming_dataset(split="train")
    except _network_errors() as error:
        raise _unreachable(source, hub["endpoint"], error) from None
    except Exception as error:  # unknown config, no data files, gated: all end the same way for the user
        raise UserError(
            f"{source.key}: cannot stream the hub dataset {source.spec!r} ({first_line(error)}); download it "
            f"where the hub is reachable and point the source at the files, e.g. {_local_hint(source)}"
        ) from None


class HubRows:
    """(number, row, None) for each row of a hub stream through the seeded shuffle buffer, in the order
    `shuffle_buffered` gives: the same algorithm, but its state (stream position, buffer, random draws) is kept
    between batches, so a lost connection is retried from where it stopped, and a later run can continue it.
    """

    def __init__(self, source: Source, stream, hub: dict, seed: int, buffer_size: int, settings: HubSettings,
                 state: dict | None = None):
        import numpy as np

        self.source, self.hub, self.buffer_size, self.settings = source, hub, buffer_size, settings
        self.stream = stream.with_format("arrow")
        self.state = state or {
            "stream": None, "buffer": [], "rng": np.random.default_rng(seed).bit_generator.state, "slots": [],
            "number": 0, "hub": hub,
        }

    def __iter__(self):
        import numpy as np

        state = self.state
        buffer, slots, size = state["buffer"], state["slots"], self.buffer_size
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        try:
            for rows in self._batches():
                for row in rows:
                    if len(buffer) < size:
                        buffer.append(row)
                        continue
                    if not slots:  # drawn as datasets draws them, kept reversed so pop() takes the next one
                        slots.extend(reversed(rng.integers(0, size, size=RANDOM_SLOTS_PER_DRAW).tolist()))
                    slot = slots.pop()
                    drawn, buffer[slot] = buffer[slot], row
                    state["number"] += 1
                    yield state["number"], drawn, None
        finally:
            state["rng"] = rng.bit_generator.state
        rng.shuffle(buffer)
        for row in buffer:
            state["number"] += 1
            yield state["number"], row, None

    def _load_position(self) -> None:
        try:
            self.stream.load_state_dict(self.state["stream"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise UserError(
                f"{self.source.key}: the saved stream position does not fit this stream ({first_line(error)}); "
                "delete the output's .work folder to start over"
            ) from None

    def _batches(self):
        """The stream's rows a batch at a time from the saved position; a lost connection is retried from the last
        whole batch until HubSettings.retry_s have passed without data, then StreamLost."""
        give_up, attempt = None, 0
        while True:
            if self.state["stream"] is not None:
                self._load_position()
            try:
                tables = iter(self.stream.iter(batch_size=min(HUB_BATCH_ROWS, self.buffer_size)))
                while True:
                    with deadline(self.settings.timeout_s):  # a batch's reads, however slowly bytes trickle in
                        table = next(tables, None)
                    if table is None:
                        return
                    give_up, attempt = None, 0
                    narrow = self.source.schema.narrow_batch
                    yield [row for batch in table.to_batches() for row in narrow(batch).to_pylist()]
                    self.state["stream"] = self.stream.state_dict()
            except Exception as error:
                if not _is_network_error(error):
                    raise
                now = time.monotonic()
                give_up = give_up or now + self.settings.retry_s
                if now >= give_up:
                    raise StreamLost(first_line(error)) from None
                attempt += 1
                wait = min(2.0**attempt, 30.0, give_up - now)
                warn(
                    f"{self.source.key}: connection to {self.hub['endpoint']} lost ({first_line(error)}); "
                    f"retry {attempt} in {wait:.0f} s ({give_up - now:.0f} s left before the run stops)"
                )
                time.sleep(wait)


def stream_hub(source: Source, seed: int, buffer_size: int, settings: HubSettings, state: dict | None = None) -> HubRows:
    """A hub source's rows through the seeded shuffle buffer. The spec is resolved now (HubRows.hub says what it
    resolved to), so an unreachable one fails before any row is mixed; `state` continues a stream a lost connection
    stopped, at the same commit."""
    from huggingface_hub import constants

    # Every request (file reads mid-stream included) gets the same bound, so a route that hangs fails fast.
    constants.HF_HUB_ETAG_TIMEOUT = constants.HF_HUB_DOWNLOAD_TIMEOUT = settings.timeout_s
    _single_attempt_reads()
    hub = state["hub"] if state else resolve_hub(source, settings)
    return HubRows(source, _hub_stream(source, hub, settings), hub, seed, buffer_size, settings, state)
