"""Atomic writes, manifests and the output policy: an output appears under its final name only once it is complete,
and no stage replaces a file or folder it did not write or an input of the same run.

The output policy, one rule for every stage:
- an output that is an input of the same run (the same path, or a folder holding an input) is refused;
- two outputs of one run may not be the same or nested folders;
- an existing output folder without a manifest of ours is refused unless the user passes --overwrite_output true;
- a folder we wrote is replaced only as a whole, atomically; the files in it that its manifest does not list (a GGUF
  file, notes) are carried over into the new folder, by hard link where the file system allows it.
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
import time
from pathlib import Path

from .cli import UserError

TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth")
FOLDER_MANIFEST = "manifest.json"
OVERWRITE_HINT = "pass --overwrite_output true to write into it anyway (files of the same name are replaced)"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")


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


DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")  # as Rust libraries (safetensors, tokenizers) say


def is_disk_full(error: BaseException) -> bool:
    """A full disk, whether an OSError says so or a library's own exception (safetensors, tokenizers) does."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(error) for text in DISK_FULL_TEXTS)


def write_error(path: Path, error: OSError) -> UserError:
    """One line for an output that cannot be written (read-only, full disk, a folder at the path)."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EISDIR: "a folder is in the way"}
    reason = reasons.get(error.errno, error.strerror or str(error))
    return UserError(f"{path}: cannot write ({reason}); the previous output, if any, is unchanged")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", manifest=None):
    """Open a temporary sibling of `path` for writing; rename it over `path` only if the block succeeds.

    With `manifest`, a function of the finished temporary file's path that returns the manifest, the file and its
    manifest (`manifest_path_for(path)`) are one unit: both are complete before either is renamed, and the old
    manifest is removed first, so an interruption or a full disk never leaves a manifest describing another file.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; choose a file name for the output")
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
        if manifest is not None:
            text = json.dumps(manifest(temporary), ensure_ascii=False, indent=2, default=str) + "\n"
            with open(manifest_temporary, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            manifest_file.unlink(missing_ok=True)
        os.replace(temporary, path)
        if manifest is not None:
            os.replace(manifest_temporary, manifest_file)
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        _remove_quietly(temporary)
        _remove_quietly(manifest_temporary)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")


def read_our_manifest(folder: Path, manifest_name: str = FOLDER_MANIFEST) -> dict | None:
    """The folder's manifest when this toolkit wrote it (a JSON object naming its stage), else None."""
    try:
        manifest = json.loads((folder / manifest_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("stage"), str)):
        return None
    files = manifest.get("files", [])  # a malformed list claims nothing: the folder is the user's
    return manifest if isinstance(files, list) and all(isinstance(name, str) for name in files) else None


def check_output_folder(path: str | os.PathLike, flag: str, overwrite: bool,
                        manifest_name: str = FOLDER_MANIFEST) -> None:
    """Refuse a file at the path, and a non-empty folder this toolkit did not write unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder; choose a folder name")
    # Hidden entries (a lock file, a killed run's temporaries) do not make a folder the user's; nothing in it is
    # removed anyway.
    if not path.is_dir() or overwrite or all(entry.name.startswith(".") for entry in path.iterdir()):
        return
    if read_our_manifest(path, manifest_name) is None:
        raise UserError(
            f"{flag} {path}: the folder exists and this toolkit did not write it (no {manifest_name} of ours); "
            f"choose another folder, or {OVERWRITE_HINT}"
        )


def check_output_file(path: str | os.PathLike, flag: str, overwrite: bool) -> None:
    """Refuse a folder at the path, and an existing file that this toolkit did not write (no manifest of ours
    beside it, or one whose sha256 it no longer matches: the user changed it) unless `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; choose a file name for the output")
    if not path.exists() or overwrite:
        return
    try:
        claimed = json.loads(manifest_path_for(path).read_text(encoding="utf-8"))["output"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        claimed = None
    if claimed is None or claimed != sha256_file(path):
        raise UserError(
            f"{flag} {path}: the file exists and this toolkit did not write it (or it was changed since: no "
            f"matching {manifest_path_for(path).name}); choose another file name, or pass --overwrite_output true "
            "to replace it"
        )


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_outputs_apart(outputs: dict[str, str], inputs: dict[str, str], folders: set[str] = frozenset()) -> None:
    """Refuse an output that is an input of the same run (or a folder holding one), and outputs that are the same
    or nested folders. `outputs` and `inputs` map a flag to a path; `folders` names the output flags that are
    folders (an input inside one would be replaced with it)."""
    resolved_inputs = {flag: Path(path).expanduser().resolve() for flag, path in inputs.items() if path}
    resolved_outputs = {flag: Path(path).expanduser().resolve() for flag, path in outputs.items() if path}
    for out_flag, output in resolved_outputs.items():
        for in_flag, source in resolved_inputs.items():
            same = output == source or (output.exists() and source.exists() and os.path.samefile(output, source))
            if same or (out_flag in folders and _is_within(source, output)):
                where = "is" if same else "holds"
                raise UserError(
                    f"{out_flag} {outputs[out_flag]} {where} the input {in_flag} {inputs[in_flag]}; writing it would "
                    f"destroy that input: choose another {out_flag}"
                )
    flags = list(resolved_outputs)
    for position, first in enumerate(flags):
        for second in flags[position + 1:]:
            a, b = resolved_outputs[first], resolved_outputs[second]
            if _is_within(a, b) or _is_within(b, a):
                raise UserError(
                    f"{first} {outputs[first]} and {second} {outputs[second]} are the same or nested folders; "
                    "give each output its own folder"
                )


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _carry_over(previous: Path, folder: Path, manifest_name: str) -> list[str]:
    """Link the entries of `previous` that its manifest does not list (the user's) into `folder`; returns them.

    One whose name the new output also has is kept as NAME.user. Without a file list (a folder of an older toolkit,
    or one written into with --overwrite_output) an entry of a name the new output has counts as replaced.
    """
    listed = (read_our_manifest(previous, manifest_name) or {}).get("files")
    ours = set(listed or []) | {manifest_name}
    carried = []
    for entry in sorted(previous.iterdir()):
        target = folder / entry.name
        if entry.name in ours or (target.exists() and listed is None):
            continue
        while target.exists():
            target = target.with_name(f"{target.name}.user")
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        else:
            _link_or_copy(str(entry), str(target))
        carried.append(entry.name if target.name == entry.name else f"{entry.name} (as {target.name})")
    return carried


def _list_files_in_manifest(folder: Path, manifest_name: str) -> None:
    """Record in the new folder's manifest which entries this toolkit wrote, so a later run can tell them from the
    user's."""
    manifest_file = folder / manifest_name
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    manifest["files"] = sorted(entry.name for entry in folder.iterdir() if not _LEFTOVER.fullmatch(entry.name))
    write_json_atomic(manifest_file, manifest)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, manifest_name: str = FOLDER_MANIFEST):
    """Yield a temporary folder; on success it replaces `path` as a whole (see the output policy above).

    The block must write `manifest_name` into the folder. The caller has checked `path` with check_output_folder.
    Entries of the old folder that its manifest does not list are carried over; nothing is lost on failure.
    """
    path = Path(path)
    clean_leftovers(path)
    temporary = _temporary_sibling(path)
    previous = _temporary_sibling(path, "old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_quietly(temporary)
        temporary.mkdir()
        yield temporary
        _list_files_in_manifest(temporary, manifest_name)
        carried = _carry_over(path, temporary, manifest_name) if path.is_dir() else []
        if path.exists():
            os.replace(path, previous)
        os.replace(temporary, path)
        if carried:
            print(f"kept in {path}/ the entries this toolkit did not write: {', '.join(carried)}")
    except OSError as error:
        raise write_error(path, error) from None
    except Exception as error:  # a library's own error for a full disk: the same one line
        if not is_disk_full(error):
            raise
        raise write_error(path, OSError(errno.ENOSPC, "No space left on device")) from None
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
    manifest_file = manifest_path_for(path)
    if not manifest_file.is_file():
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


def manifest_path_for(output_file: str | os.PathLike) -> Path:
    """`data.jsonl` -> `data.manifest.json`, next to it."""
    output_file = Path(output_file)
    return output_file.with_name(f"{output_file.stem}.manifest.json")


def build_manifest(stage: str, config: dict, **fields) -> dict:
    return {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": dict(config),
        **fields,
        "versions": package_versions(),
    }
