"""What a mix stopped by a lost hub stream has done, kept next to its output so that the same command continues it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections import Counter
from pathlib import Path

from ..artifacts import atomic_file
from .drawing import SourceStats
from .hub import HUB_IDENTITY_KEYS
from .plan import MixPlan

NETWORK_SETTINGS = ("HUB_TIMEOUT_SECONDS", "NETWORK_RETRY_SECONDS")  # a rerun may change these and still continue


class WorkFolder:
    """What a run stopped by a lost hub stream has done, kept next to OUTPUT_FILE (`<OUTPUT_FILE>.work/`) so that the
    same command continues it: the rows kept so far, the sources finished, and the lost stream's position, shuffle
    buffer and random draws. Only a run with the same configuration (and unchanged local files) picks it up.

    The state is JSON, never pickle: a file someone else put there is data, never code. Its first line holds the
    format and the fingerprint, read (bounded) before the rest; a state that does not fit is ignored with a warning.
    """

    FORMAT = "qwen_sft mix work state 2"
    HEADER_BYTES = 4096  # the first line's most: a longer one is not ours

    def __init__(self, output_file: Path):
        self.folder = output_file.with_name(output_file.name + ".work")
        self.state_file = self.folder / "state.json"

    @staticmethod
    def fingerprint(cfg, plan: MixPlan) -> str:
        files = [
            (str(path), path.stat().st_size, path.stat().st_mtime_ns)
            for source in plan.sources if not source.is_hub for path in source.files
        ]
        settings = {key: str(value) for key, value in sorted(cfg.items()) if key not in NETWORK_SETTINGS}
        text = json.dumps([settings, files])
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self, fingerprint: str, plan: MixPlan) -> dict | None:
        if not self.state_file.is_file():
            return None
        try:
            with open(self.state_file, "rb") as handle:
                header = json.loads(handle.readline(self.HEADER_BYTES))
                if header != {"format": self.FORMAT, "fingerprint": fingerprint}:
                    print(f"warning: {self.folder} holds work of another configuration; starting over (it will be "
                          "replaced)")
                    return None
                return _state_from_json(json.loads(handle.read(), object_hook=_untag_bytes), plan)
        except (OSError, ValueError, RecursionError, KeyError, IndexError, TypeError, AttributeError) as error:
            print(f"warning: {self.state_file} cannot be read ({type(error).__name__}); starting over")
            return None

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        header = {"format": self.FORMAT, "fingerprint": state["fingerprint"]}
        with atomic_file(self.state_file, "w") as handle:
            handle.write(json.dumps(header) + "\n")
            json.dump(_state_to_json(state), handle, default=_tag_bytes)

    def remove(self) -> None:
        """Delete what we wrote: the state file, then the folder if nothing else is in it."""
        if self.state_file.is_file():
            self.state_file.unlink()
            with contextlib.suppress(OSError):
                self.folder.rmdir()


BYTES_TAG = "\x00bytes"  # a JSON object {BYTES_TAG: base64} is a bytes value of a hub row in the shuffle buffer


def _tag_bytes(value):
    """json.dump's fallback for a hub row's values: bytes are tagged, anything else (dates) kept as its text."""
    if isinstance(value, bytes):
        return {BYTES_TAG: base64.b64encode(value).decode("ascii")}
    return str(value)


def _untag_bytes(item: dict):
    return base64.b64decode(item[BYTES_TAG], validate=True) if set(item) == {BYTES_TAG} else item


def _latin1(data: bytes) -> str:
    return data.decode("latin-1")  # every byte is one character, so any bytes survive JSON unchanged


def _from_latin1(text) -> bytes:
    if not isinstance(text, str):
        raise TypeError("a string expected")
    return text.encode("latin-1")  # a UnicodeEncodeError (a ValueError) for text _latin1 never wrote


def _state_to_json(state: dict) -> dict:
    lines, seen, stats, kept = state["mixer"]
    return {
        "done": state["done"], "hub": state["hub"], "source": state["source"], "rows": state["rows"],
        "lines": [line.decode() for line in lines],  # each a JSON line, UTF-8
        "seen": [_latin1(digest) for digest in seen],
        "stats": {key: {**vars(item), "warned": sorted(item.warned)} for key, item in stats.items()},
        "kept": kept,
    }


def _state_from_json(body: dict, plan: MixPlan) -> dict:
    """The state save() wrote, its shape checked: a TypeError, KeyError or ValueError for anything else."""
    def texts(value) -> list:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise TypeError("a list of strings expected")
        return value

    if not all(set(HUB_IDENTITY_KEYS) <= set(hub) for hub in body["hub"].values()):
        raise KeyError("a hub source's identity")
    keys = set(plan.buckets)
    stats = {}
    for key, item in body["stats"].items():
        counters = {name: Counter({str(k): int(v) for k, v in item[name].items()})
                    for name in ("rejected", "filtered", "unrouted", "keyword_hits", "kept")}
        stats[str(key)] = SourceStats(read=int(item["read"]), duplicates=int(item["duplicates"]),
                                      bad_rows_shown=int(item["bad_rows_shown"]),
                                      reached_max_rows_read=bool(item["reached_max_rows_read"]),
                                      seconds=float(item["seconds"]), warned=set(texts(item["warned"])), **counters)
    kept = {key: int(count) for key, count in body["kept"].items()}
    lines = [line.encode() for line in texts(body["lines"])]
    if not set(kept) <= keys or len(lines) != sum(kept.values()) or set(stats) != {s.key for s in plan.sources}:
        raise ValueError("buckets or sources differ from the plan's")
    rows = body["rows"]
    if rows is not None:
        _check_hub_rows_state(rows)
    return {
        "done": texts(body["done"]), "hub": dict(body["hub"]), "source": body["source"], "rows": rows,
        "mixer": (lines, {_from_latin1(digest) for digest in body["seen"]}, stats, kept),
    }


def _check_hub_rows_state(rows: dict) -> None:
    """A HubRows state as HubRows keeps it (see hub.py), or a TypeError, KeyError or ValueError."""
    import numpy as np

    hub_keys = {"endpoint": str, "repo_id": str, "commit_sha": str, "revision": str}
    if not (isinstance(rows["buffer"], list) and all(isinstance(row, dict) for row in rows["buffer"])
            and all(type(slot) is int for slot in rows["slots"]) and type(rows["number"]) is int
            and isinstance(rows["stream"], (dict, type(None)))
            and all(isinstance(rows["hub"][key], kind) for key, kind in hub_keys.items())
            and isinstance(rows["hub"]["data_files"], (list, type(None)))):
        raise TypeError("a hub stream's state expected")
    np.random.default_rng().bit_generator.state = rows["rng"]  # numpy's own check of the random draws

