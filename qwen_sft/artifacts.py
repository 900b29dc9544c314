"""Atomic writes, manifests and the output rule: an output appears under its final name only once it is complete,
and no stage replaces a file or folder it did not write or an input of the same run.

The output rule, one for every stage: each stage calls claim_outputs before it writes, then writes through
atomic_file, atomic_directory or append_to_file.
- Ours to replace is only what this stage wrote: a folder whose manifest names the same stage, a file whose manifest
  (`NAME.manifest.json` beside it) names the same stage and records its sha256, and in a folder, the files its
  manifest lists with the sha256 they still have. Everything else is the user's: an existing output of the user's is
  refused unless --overwrite_output true, and even then nothing of the user's in a folder is removed (it is carried
  over into the new folder, as NAME.user where the new output has that name).
- A manifest path is checked like its output; no two outputs share one.
- No output is an input of the same run, sits inside an input folder, or (a folder) holds one.
- Writes follow a symlink to what it points at; the link is never replaced. Devices, FIFOs and sockets are refused.
  A replaced file or folder keeps its mode. Appending appends in place (links, hard links and mode stay).
- Every folder a stage writes is locked for the run (qwen_sft/locking.py); export also locks the adapter it reads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .cli import UserError
from .locking import folder_lock

TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth")
FOLDER_MANIFEST = "manifest.json"
MANIFEST_SUFFIX = ".manifest.json"
OVERWRITE_HINT = "pass --overwrite_output true to write into it anyway (nothing of yours in it is removed)"
# The two data stages write the same kind of output, a mix: either may replace the other's.
MIX_STAGES = frozenset({"data_integration", "data_set_generation"})
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")

FILE = "file"  # replaced whole by atomic_file; its manifest beside it
FOLDER = "folder"  # replaced whole by atomic_directory; its manifest inside
WORKDIR = "workdir"  # a folder written into in place (training's checkpoints); its manifest inside
APPEND = "append"  # a file appended to (chat's /save): nothing in it is replaced, so anyone's file may be named


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temporary_sibling(path: Path, kind: str = "partial") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(path: Path) -> None:
    """Remove the temporary siblings of `path` that a killed run (a PID no longer alive) left behind. An `.old`
    folder of an interrupted swap is put back when `path` itself is missing."""
    with contextlib.suppress(OSError):
        for sibling in path.parent.iterdir():
            match = _LEFTOVER.fullmatch(sibling.name)
            if not match or match["name"] != path.name or _pid_alive(int(match["pid"])):
                continue
            if match["kind"] == "old" and not path.exists():
                os.replace(sibling, path)
                print(f"restored {path} from {sibling.name}, left by an interrupted run")
            elif sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def _remove_quietly(path: Path) -> None:
    """Cleanup that must not hide the error that caused it (a read-only mount cannot be cleaned either)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_error(path: Path, error: OSError) -> UserError:
    """One line for an output that cannot be written (read-only, full disk, a folder at the path)."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EISDIR: "a folder is in the way"}
    reason = reasons.get(error.errno, error.strerror or str(error))
    return UserError(f"{path}: cannot write ({reason}); the previous output, if any, is unchanged")


# ---------------------------------------------------------------------------------------------------- where writes go


def write_target(path: str | os.PathLike, flag: str = "") -> Path:
    """Where writing `path` lands: symlinks followed to what they point at, so that the link itself stays."""
    path = Path(path).expanduser()
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # RuntimeError: a loop of symlinks (Python 3.11)
        raise UserError(f"{flag + ' ' if flag else ''}{path}: a loop of symbolic links; fix or remove it") from None


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def _special(mode: int) -> str | None:
    """What a path that is neither a regular file nor a folder is, for the message refusing it."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return None


def _require_file(target: Path, shown: str) -> None:
    """A file output: nothing there yet, or a regular file (never a folder, a device, a FIFO or a socket)."""
    status = _lstat(target)
    if status is None or stat.S_ISREG(status.st_mode):
        return
    if stat.S_ISDIR(status.st_mode):
        raise UserError(f"{shown}: is a folder; choose a file name for the output")
    raise UserError(f"{shown}: is {_special(status.st_mode)}, not a regular file; outputs are written to regular files "
                    "only: choose another file name")


def _require_folder(target: Path, shown: str) -> None:
    status = _lstat(target)
    if status is not None and not stat.S_ISDIR(status.st_mode):
        what = "a file" if stat.S_ISREG(status.st_mode) else _special(status.st_mode)
        raise UserError(f"{shown}: is {what}, not a folder; choose a folder name")


# ---------------------------------------------------------------------------------------------------- manifests


def manifest_path_for(output_file: str | os.PathLike) -> Path:
    """`data.jsonl` -> `data.jsonl.manifest.json`, next to it: each output file has a manifest name of its own."""
    output_file = Path(output_file)
    return output_file.with_name(output_file.name + MANIFEST_SUFFIX)


def legacy_manifest_path_for(output_file: str | os.PathLike) -> Path:
    """The name earlier versions gave the manifest (`data.manifest.json`), which `data.json` shared."""
    output_file = Path(output_file)
    return output_file.with_name(output_file.stem + MANIFEST_SUFFIX)


def same_stage(recorded, stage: str) -> bool:
    return isinstance(recorded, str) and (recorded == stage or {recorded, stage} <= MIX_STAGES)


def _read_manifest(path: Path) -> dict | None:
    """A manifest of this toolkit at `path`: a regular file (not a link) holding a JSON object that names a stage."""
    status = _lstat(path)
    if status is None or not stat.S_ISREG(status.st_mode):
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("stage"), str) else None


def read_our_manifest(folder: Path, manifest_name: str = FOLDER_MANIFEST) -> dict | None:
    """The folder's manifest when this toolkit wrote it (a JSON object naming its stage), else None."""
    return _read_manifest(Path(folder) / manifest_name)


def _describes(manifest: dict | None, output_file: Path) -> bool:
    """Whether a file manifest is about `output_file` (a legacy name was shared by `x.json` and `x.jsonl`)."""
    output = (manifest or {}).get("output")
    return isinstance(output, dict) and isinstance(output.get("path"), str) and Path(output["path"]).name == \
        output_file.name


def find_manifest(output_file: str | os.PathLike) -> Path | None:
    """The manifest of an output file: its own name, or the name earlier versions used when that one describes this
    file; None if there is neither."""
    target = write_target(output_file)
    own = manifest_path_for(target)
    if _lstat(own) is not None:
        return own
    legacy = legacy_manifest_path_for(target)
    return legacy if _describes(_read_manifest(legacy), target) else None


def _recorded_sha256(manifest: dict | None):
    with contextlib.suppress(AttributeError, TypeError):
        return manifest["output"]["sha256"]
    return None


def _file_is_ours(target: Path, stage: str) -> bool:
    """A file is ours if a manifest of the same stage beside it records the sha256 it still has."""
    manifest_file = find_manifest(target)
    manifest = _read_manifest(manifest_file) if manifest_file else None
    return (manifest is not None and same_stage(manifest["stage"], stage)
            and _recorded_sha256(manifest) == sha256_file(target))


def _digest(path: Path) -> str | None:
    """sha256 of a regular file, or of a folder's names and digests; None for a link or a special file (we write
    neither, so those are never ours)."""
    status = _lstat(path)
    if status is not None and stat.S_ISREG(status.st_mode):
        return sha256_file(path)
    if status is None or not stat.S_ISDIR(status.st_mode):
        return None
    parts = {entry.name: _digest(entry) for entry in sorted(path.iterdir())}
    if None in parts.values():
        return None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _set_aside(path: Path) -> None:
    """Keep the user's file at `path` as NAME.user (NAME.user.user, ...), out of the way of ours."""
    kept = path
    while _lstat(kept) is not None:
        kept = kept.with_name(kept.name + ".user")
    os.rename(path, kept)
    print(f"kept {path.name} (not written by this stage) as {kept.name}")


def _clear_manifests(target: Path, stage: str) -> None:
    """Before a file is replaced: its old manifest goes if ours (and the legacy-named one if it describes this
    file), so that no manifest is ever left describing another file; the user's file of that name is set aside."""
    own = manifest_path_for(target)
    if _lstat(own) is not None:
        manifest = _read_manifest(own)
        if manifest is not None and same_stage(manifest["stage"], stage):
            own.unlink()
        else:
            _set_aside(own)
    legacy = legacy_manifest_path_for(target)
    manifest = _read_manifest(legacy)
    if manifest is not None and same_stage(manifest["stage"], stage) and _describes(manifest, target):
        legacy.unlink()


# ---------------------------------------------------------------------------------------------------- the claim


@dataclass(frozen=True)
class Output:
    """One thing a stage writes: `flag` names it in messages, `kind` says how it is written (FILE, FOLDER, WORKDIR
    or APPEND), `manifest` is the manifest's name inside a folder."""

    flag: str
    path: str | os.PathLike
    kind: str = FILE
    manifest: str = FOLDER_MANIFEST


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a == b or os.path.samefile(a, b)
    return a == b


def _check_apart(outputs: list[Output], targets: dict[str, Path], inputs: dict[str, str]) -> None:
    """No output is an input, sits inside an input folder, or (a folder replaced whole) holds an input; no two
    outputs are the same or nested."""
    sources = {flag: write_target(path, flag) for flag, path in inputs.items() if path}
    for output in outputs:
        target = targets[output.flag]
        written = [target, manifest_path_for(target)] if output.kind == FILE else [target]
        for in_flag, source in sources.items():
            problem = (
                "is" if any(_same_file(path, source) for path in written)
                else "is inside" if source.is_dir() and any(_is_within(path, source) for path in written)
                else "holds" if output.kind == FOLDER and _is_within(source, target) else None
            )
            if problem:
                raise UserError(
                    f"{output.flag} {output.path} {problem} the input {in_flag} {inputs[in_flag]}; writing it would "
                    f"destroy that input: choose another {output.flag}"
                )
    for position, first in enumerate(outputs):
        for second in outputs[position + 1:]:
            a, b = targets[first.flag], targets[second.flag]
            if _is_within(a, b) or _is_within(b, a):
                raise UserError(
                    f"{first.flag} {first.path} and {second.flag} {second.path} are the same or nested folders; "
                    "give each output its own folder"
                )


def _check_shape(output: Output, target: Path) -> None:
    """A file output is a regular file (its manifest too), a folder output a folder, or nothing yet."""
    shown = f"{output.flag} {output.path}"
    if output.kind in (FOLDER, WORKDIR):
        _require_folder(target, shown)
        return
    _require_file(target, shown)
    if output.kind == FILE:
        manifest_file = manifest_path_for(target)
        status = _lstat(manifest_file)
        if status is not None and not stat.S_ISREG(status.st_mode):
            what = "a folder" if stat.S_ISDIR(status.st_mode) else _special(status.st_mode)
            raise UserError(f"{manifest_file}: the manifest path of {shown} is {what}; a manifest is written only "
                            "as a regular file: move it away, or choose another file name")


def _check_ownership(output: Output, target: Path, stage: str) -> None:
    """Refuse an existing output that this stage did not write (the caller skips this with --overwrite_output)."""
    shown = f"{output.flag} {output.path}"
    if output.kind == APPEND or _lstat(target) is None:
        if output.kind == FILE:
            _check_manifest_path(output, target, stage)
        return
    if output.kind == FILE:
        if not _file_is_ours(target, stage):
            raise UserError(
                f"{shown}: the file exists and this toolkit did not write it (or it was changed since: no matching "
                f"{manifest_path_for(target).name}); choose another file name, or pass --overwrite_output true to "
                "replace it"
            )
        _check_manifest_path(output, target, stage)
        return
    if all(entry.name.startswith(".") for entry in target.iterdir()):
        return  # empty, or only hidden entries (a killed run's temporaries): nothing in it is removed anyway
    manifest = read_our_manifest(target, output.manifest)
    if manifest is None:
        raise UserError(f"{shown}: the folder exists and this toolkit did not write it (no {output.manifest} of "
                        f"ours); choose another folder, or {OVERWRITE_HINT}")
    if not same_stage(manifest["stage"], stage):
        raise UserError(f"{shown}: the folder was written by another stage ({manifest['stage']}, says its "
                        f"{output.manifest}), not by {stage}; choose another folder, or {OVERWRITE_HINT}")


def _check_manifest_path(output: Output, target: Path, stage: str) -> None:
    manifest_file = manifest_path_for(target)
    manifest = _read_manifest(manifest_file)
    if _lstat(manifest_file) is not None and (manifest is None or not same_stage(manifest["stage"], stage)):
        raise UserError(
            f"{manifest_file}: this toolkit's {stage} stage did not write it, and it is the manifest path of "
            f"{output.flag} {output.path}; move it away, or pass --overwrite_output true (it is then kept as "
            f"{manifest_file.name}.user)"
        )


@contextlib.contextmanager
def claim_outputs(inputs: dict[str, str], outputs: list[Output], stage: str, overwrite: bool, lock: bool = True):
    """The output rule (see the module docstring), for every stage before it writes: yields {flag: the path to write,
    links followed}. The folders are locked for the block (`lock` False: another process of the run holds them).

    `inputs` maps a flag to a path the run reads (empty: none); with `overwrite` (--overwrite_output true) an
    existing output of the user's is written anyway, but nothing of the user's in a folder is removed.
    """
    targets = {output.flag: write_target(output.path, output.flag) for output in outputs}
    for output in outputs:
        _check_shape(output, targets[output.flag])
    _check_apart(outputs, targets, inputs)
    with contextlib.ExitStack() as locks:
        if lock:
            for output in outputs:
                if output.kind in (FOLDER, WORKDIR):
                    locks.enter_context(folder_lock(targets[output.flag], output.flag))
        if not overwrite:
            for output in outputs:
                _check_ownership(output, targets[output.flag], stage)
        yield targets


# ---------------------------------------------------------------------------------------------------- writers


def _mode_of(path: Path) -> int | None:
    status = _lstat(path)
    return stat.S_IMODE(status.st_mode) if status is not None else None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", manifest=None):
    """Open a temporary sibling of `path` (its link target, if a link) for writing; rename it over the file only if
    the block succeeds, with the old file's mode.

    With `manifest`, a function of the finished temporary file's path that returns the manifest, the file and its
    manifest (`manifest_path_for(path)`) are one unit: both are complete before either is renamed, and the old
    manifest is removed first, so an interruption or a full disk never leaves a manifest describing another file.
    """
    shown = Path(path)
    path = write_target(path)
    _require_file(path, str(shown))
    manifest_file = manifest_path_for(path)
    clean_leftovers(path)
    if manifest is not None:
        clean_leftovers(manifest_file)
    temporary = _temporary_sibling(path)
    manifest_temporary = _temporary_sibling(manifest_file)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        kept_mode = _mode_of(path)
        if kept_mode is not None:
            os.chmod(temporary, kept_mode)
        if manifest is not None:
            record = manifest(temporary)
            text = json.dumps(record, ensure_ascii=False, indent=2, default=str) + "\n"
            with open(manifest_temporary, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(manifest_temporary, _mode_of(temporary))  # a private output keeps a private manifest
            _clear_manifests(path, record["stage"])
        os.replace(temporary, path)
        if manifest is not None:
            os.replace(manifest_temporary, manifest_file)
    except OSError as error:
        raise write_error(shown, error) from None
    finally:
        _remove_quietly(temporary)
        _remove_quietly(manifest_temporary)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")


def append_to_file(path: str | os.PathLike, text: str) -> None:
    """Append `text` to the file at `path` (its link target, if a link) in place, so that its links, hard links and
    mode stay; a line is started first if the file does not end with one. A failed write is cut back off, so the
    file never keeps half of it. Only regular files: a FIFO, a device or a folder is refused in one line."""
    shown = Path(path)
    target = write_target(path)
    _require_file(target, str(shown))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_NONBLOCK: a FIFO put there after the check must not block the open; it is refused below.
        fd = os.open(target, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as error:
        raise write_error(shown, error) from None
    try:
        _require_file_fd(fd, shown)
        size = os.fstat(fd).st_size
        data = text.encode("utf-8")
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise write_error(shown, error) from None
    finally:
        os.close(fd)


def _require_file_fd(fd: int, shown: Path) -> None:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        raise UserError(f"{shown}: is {_special(mode) or 'a folder'}, not a regular file; choose another file name")


def mark_workdir(folder: str | os.PathLike, manifest: dict, manifest_name: str = FOLDER_MANIFEST) -> None:
    """Mark a folder written in place (WORKDIR) as the stage's, so that later runs may write (and resume) there; a
    file of the user's under the manifest's name is kept as NAME.user."""
    manifest_file = write_target(folder) / manifest_name
    existing = _read_manifest(manifest_file)
    if existing is not None and same_stage(existing["stage"], manifest["stage"]):
        return
    if _lstat(manifest_file) is not None:
        _set_aside(manifest_file)
    write_json_atomic(manifest_file, manifest)


def _list_files_in_manifest(folder: Path, manifest_name: str) -> str:
    """Record in the new folder's manifest which entries this toolkit wrote, with their sha256, so that a later run
    can tell them from the user's (a name alone could be forged or the file changed since); returns its stage."""
    manifest_file = folder / manifest_name
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    entries = sorted(entry for entry in folder.iterdir()
                     if entry.name != manifest_name and not _LEFTOVER.fullmatch(entry.name))
    manifest["files"] = {entry.name: _digest(entry) for entry in entries}
    write_json_atomic(manifest_file, manifest)
    return manifest["stage"]


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _ours_in(previous: Path, manifest_name: str, stage: str) -> set[str]:
    """The entries of the old folder that this stage wrote: listed in a manifest of the same stage, with the sha256
    they still have (a list of names alone, as an older version or a forger wrote, proves nothing)."""
    manifest = read_our_manifest(previous, manifest_name)
    if manifest is None or not same_stage(manifest["stage"], stage):
        return set()
    listed = manifest.get("files")
    listed = listed if isinstance(listed, dict) else {}
    ours = {manifest_name}
    for entry in previous.iterdir():
        recorded = listed.get(entry.name)
        if isinstance(recorded, str) and _digest(entry) == recorded:
            ours.add(entry.name)
    return ours


def _carry_over(previous: Path, folder: Path, manifest_name: str, stage: str) -> list[str]:
    """Link the entries of `previous` that this stage did not write (the user's) into `folder`; returns them.
    One whose name the new output also has is kept as NAME.user."""
    ours = _ours_in(previous, manifest_name, stage)
    carried = []
    for entry in sorted(previous.iterdir()):
        if entry.name in ours:
            continue
        target = folder / entry.name
        while _lstat(target) is not None:
            target = target.with_name(f"{target.name}.user")
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_file():
            _link_or_copy(str(entry), str(target))
        else:  # a FIFO or device node of the user's: linked, never opened
            os.link(entry, target)
        carried.append(entry.name if target.name == entry.name else f"{entry.name} (as {target.name})")
    return carried


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, manifest_name: str = FOLDER_MANIFEST):
    """Yield a temporary folder; on success it replaces `path` (its link target, if a link) as a whole.

    The block must write `manifest_name`, naming the stage, into the folder; the caller has claimed `path`
    (claim_outputs). Entries of the old folder that this stage did not write are carried over; the new folder takes
    the old one's mode; nothing is lost on failure.
    """
    shown = Path(path)
    path = write_target(path)
    _require_folder(path, str(shown))
    clean_leftovers(path)
    temporary = _temporary_sibling(path)
    previous = _temporary_sibling(path, "old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_quietly(temporary)
        temporary.mkdir()
        yield temporary
        stage = _list_files_in_manifest(temporary, manifest_name)
        carried = _carry_over(path, temporary, manifest_name, stage) if path.is_dir() else []
        if path.is_dir():
            os.chmod(temporary, _mode_of(path))
            os.replace(path, previous)
        os.replace(temporary, path)
        if carried:
            print(f"kept in {shown}/ the entries this toolkit did not write: {', '.join(carried)}")
    except OSError as error:
        raise write_error(shown, error) from None
    finally:
        _remove_quietly(temporary)
        if previous.exists() and not path.exists():  # the swap failed half-way: the old folder goes back
            with contextlib.suppress(OSError):
                os.replace(previous, path)
    _remove_quietly(previous)


def warn_if_manifest_differs(path: str | os.PathLike) -> None:
    """A file and its manifest are one unit: say so in one line when the manifest beside `path` describes another
    file (edited by hand, or written by an interrupted older run)."""
    path = Path(path)
    manifest_file = find_manifest(path)
    if manifest_file is None or not manifest_file.is_file():
        return
    try:
        claimed = json.loads(manifest_file.read_text(encoding="utf-8"))["output"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        print(f"warning: {manifest_file} is unreadable or has no output sha256; it does not describe {path}")
        return
    if claimed != sha256_file(path):
        print(f"warning: {path} does not match its manifest {manifest_file} (sha256 differs): the file was changed "
              "after it was written, so the manifest's counts do not describe it")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def build_manifest(stage: str, config: dict, **fields) -> dict:
    return {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": dict(config),
        **fields,
        "versions": package_versions(),
    }
