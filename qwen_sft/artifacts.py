"""Atomic writes, manifests and the output rule: an output appears under its final name only once it is complete,
and no stage replaces a file or folder it did not write or an input of the same run.

The output rule, one for every stage: each stage calls claim_outputs before it writes, then writes through
atomic_file, atomic_directory or append_to_file.
- Ours to replace is only what this stage wrote: a folder whose manifest names the same stage (or a truly empty
  one), a file whose manifest (`NAME.manifest.json` beside it) names the same stage and records its sha256, and in a
  folder, the files its manifest lists with the sha256 they still have. Everything else is the user's: an existing
  output of the user's is refused unless --overwrite_output true, and even then nothing of the user's in a folder is
  removed (it is carried over into the new folder, as NAME.user where the new output has that name).
- A manifest path is checked like its output; no two outputs share one. A toolkit manifest of any stage about the
  file is replaced with it; anything else there is the user's (kept as NAME.user).
- A folder replaced whole never holds a mount point; a WORKDIR never holds a checkpoint-* folder training did not
  write (the HF Trainer's rotation deletes them), even with --overwrite_output.
- No output is an input of the same run, sits inside an input folder, or (a folder) holds one.
- Writes follow a symlink to what it points at; the link is never replaced. Devices, FIFOs and sockets are refused.
  A replaced file or folder keeps its mode. Appending appends in place (links, hard links and mode stay).
- Every file and folder a stage writes is locked for the run (qwen_sft/locking.py); export also locks the adapter it
  reads. The writers re-check at rename time that each output is still what the claim checked.
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
                if mount_inside(sibling) is None:  # never delete into another file system
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


_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.EISDIR: "a folder is in the way",
            errno.ENAMETOOLONG: "the name is too long", errno.ELOOP: "a loop of symbolic links"}


def write_error(path: Path, error: OSError) -> UserError:
    """One line for an output that cannot be written (read-only, full disk, a folder at the path)."""
    reason = _REASONS.get(error.errno, error.strerror or str(error))
    return UserError(f"{path}: cannot write ({reason}); the previous output, if any, is unchanged")


def path_error(path: Path, error: OSError) -> UserError:
    """One line for a path that cannot even be looked at (a name too long, permission denied on its folder)."""
    reason = _REASONS.get(error.errno, error.strerror or str(error))
    return UserError(f"{path}: cannot use this path ({reason}); choose another name")


# ---------------------------------------------------------------------------------------------------- where writes go


def write_target(path: str | os.PathLike, flag: str = "") -> Path:
    """Where writing `path` lands: symlinks followed to what they point at, so that the link itself stays."""
    path = Path(path).expanduser()
    try:
        return path.resolve()
    except RuntimeError:  # a loop of symlinks (Python 3.11)
        raise UserError(f"{flag + ' ' if flag else ''}{path}: a loop of symbolic links; fix or remove it") from None
    except OSError as error:
        raise path_error(path, error) from None


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise path_error(path, error) from None


def _kind(mode: int) -> str:
    """What is at a path, for the one message refusing it."""
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "a special file"


def _refuse_kind(shown, mode: int, wanted: str) -> UserError:
    return UserError(f"{shown}: is {_kind(mode)}, not {wanted}; outputs are written only as regular files and "
                     "folders: choose another name")


def _require_file(target: Path, shown: str) -> None:
    """A file output: nothing there yet, or a regular file (never a folder, a device, a FIFO or a socket)."""
    status = _lstat(target)
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise _refuse_kind(shown, status.st_mode, "a regular file")


def _require_folder(target: Path, shown: str) -> None:
    status = _lstat(target)
    if status is not None and not stat.S_ISDIR(status.st_mode):
        raise _refuse_kind(shown, status.st_mode, "a folder")


def _identity(path: Path) -> tuple[int, int] | None:
    status = _lstat(path)
    return None if status is None else (status.st_dev, status.st_ino)


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


def _describes(manifest: dict | None, output_file: Path, shared_name: bool = False) -> bool:
    """Whether a toolkit manifest is about `output_file`: it names no other output, and under a name that two files
    share (the legacy `x.manifest.json` of `x.json` and `x.jsonl`) it names this one."""
    if manifest is None:
        return False
    output = manifest.get("output")
    path = output.get("path") if isinstance(output, dict) else None
    return Path(path).name == output_file.name if isinstance(path, str) else not shared_name


def _recorded_sha256(manifest: dict | None):
    with contextlib.suppress(AttributeError, TypeError, KeyError):
        return manifest["output"]["sha256"]
    return None


def _file_manifest(output_file: Path) -> tuple[Path, dict] | None:
    """The one place that tells which manifest is an output file's: a toolkit manifest under its own name, or the
    name earlier versions used, that describes this file (not `x.json`'s when this is `x.jsonl`)."""
    for candidate, shared_name in ((manifest_path_for(output_file), False),
                                   (legacy_manifest_path_for(output_file), True)):
        manifest = _read_manifest(candidate)
        if _describes(manifest, output_file, shared_name):
            return candidate, manifest
    return None


def find_manifest(output_file: str | os.PathLike) -> Path | None:
    """The manifest of an output file (see _file_manifest); None if there is none."""
    found = _file_manifest(write_target(output_file))
    return found[0] if found else None


def _file_writer(target: Path) -> str | None:
    """The stage that wrote the file at `target`: its manifest's, if that records the sha256 the file still has."""
    found = _file_manifest(target)
    if found and _recorded_sha256(found[1]) == sha256_file(target):
        return found[1]["stage"]
    return None


def _manifest_is_users(target: Path) -> bool:
    """Whether something is at the manifest path of `target` that no stage of this toolkit wrote about `target`:
    the user's, never removed (a toolkit manifest of any stage about this file is replaced along with it)."""
    manifest_file = manifest_path_for(target)
    return _lstat(manifest_file) is not None and not _describes(_read_manifest(manifest_file), target)


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
    print(f"kept {path.name} (not written by this toolkit about {path.name[:-len(MANIFEST_SUFFIX)]}) as {kept.name}")


def _finish_interrupted_swap(target: Path) -> None:
    """atomic_file renames the file, then its manifest: a run stopped in between (killed, or this process after a
    failed rename) left the new file and, as a temporary, the complete manifest describing it; it is put in place."""
    manifest_file = manifest_path_for(target)
    if _lstat(target) is None or _manifest_is_users(target):
        return
    with contextlib.suppress(OSError):
        for sibling in target.parent.iterdir():
            match = _LEFTOVER.fullmatch(sibling.name)
            if not match or match["name"] != manifest_file.name or match["kind"] != "partial":
                continue
            if int(match["pid"]) != os.getpid() and _pid_alive(int(match["pid"])):
                continue  # another live run's, still writing
            manifest = _read_manifest(sibling)
            if _describes(manifest, target) and _recorded_sha256(manifest) == sha256_file(target):
                os.replace(sibling, manifest_file)
                print(f"completed {manifest_file.name}, left half-way by an interrupted run")
                return


# ---------------------------------------------------------------------------------------------------- the claim


@dataclass(frozen=True)
class Output:
    """One thing a stage writes: `flag` names it in messages, `kind` says how it is written (FILE, FOLDER, WORKDIR
    or APPEND), `manifest` is the manifest's name inside a folder."""

    flag: str
    path: str | os.PathLike
    kind: str = FILE
    manifest: str = FOLDER_MANIFEST


# What each claimed output was when it was checked, {target: (st_dev, st_ino) or None}: the writers re-check it just
# before they rename, so that nothing put there meanwhile (a file, a link) is replaced unchecked.
_CLAIMED: dict[Path, tuple | None] = {}
# {the path as the stage named it: its target at the claim}: a writer given that name again (not the target) must
# still land there, not where a link swapped in meanwhile points.
_CLAIMED_NAMES: dict[Path, Path] = {}


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a == b or os.path.samefile(a, b)
    return a == b


def _conflict(output: Output, target: Path, source: Path) -> str | None:
    """How an output would destroy an input ("is", "is inside", "holds"), or None."""
    written = [target, manifest_path_for(target)] if output.kind == FILE else [target]
    if any(_same_file(path, source) for path in written):
        return "is"
    if source.is_dir() and any(_is_within(path, source) for path in written):
        return "is inside"
    if output.kind == FOLDER and _is_within(source, target):
        return "holds"
    return None


def _check_apart(outputs: list[Output], targets: dict[str, Path], inputs: dict[str, str]) -> None:
    """No output is an input, sits inside an input folder, or (a folder replaced whole) holds an input; no two
    outputs are the same or nested."""
    sources = {flag: write_target(path, flag) for flag, path in inputs.items() if path}
    for output in outputs:
        for in_flag, source in sources.items():
            problem = _conflict(output, targets[output.flag], source)
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


def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    with contextlib.suppress(OSError, ValueError):
        return os.pathconf(folder, "PC_NAME_MAX")
    return 255


def _check_name_length(output: Output, target: Path, shown: str) -> None:
    """Every name written beside the output (its manifest, temporaries and lock) fits the file system, so that a
    long name is refused before any work, not after it."""
    name = target.name + (MANIFEST_SUFFIX if output.kind == FILE else "")
    longest = len(os.fsencode(f".{name}.partial-{os.getpid()}"))
    if longest > _name_max(target.parent):
        raise UserError(f"{shown}: the name is too long ({len(os.fsencode(target.name))} bytes; the names written "
                        f"beside it need up to {longest}, the file system allows {_name_max(target.parent)}); "
                        "choose a shorter name")


def _check_shape(output: Output, target: Path) -> None:
    """A file output is a regular file (its manifest too), a folder output a folder, or nothing yet."""
    shown = f"{output.flag} {output.path}"
    if output.kind != APPEND:
        _check_name_length(output, target, shown)
    if output.kind in (FOLDER, WORKDIR):
        _require_folder(target, shown)
        return
    _require_file(target, shown)
    if output.kind == FILE:
        status = _lstat(manifest_path_for(target))
        if status is not None and not stat.S_ISREG(status.st_mode):
            raise _refuse_kind(f"{manifest_path_for(target)} (the manifest path of {shown})", status.st_mode,
                               "a regular file")


def _mount_points() -> set[Path]:
    """Every mount point of this process (bind mounts too, which st_dev alone does not show)."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        return {Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])) for line in lines}
    return set()


def mount_inside(folder: Path) -> Path | None:
    """A file system mounted inside `folder` (a folder replaced whole must never copy across it nor delete into it)."""
    if _lstat(folder) is None or not folder.is_dir():
        return None
    for mount in _mount_points():
        if mount != folder and _is_within(mount, folder):
            return mount
    device = os.lstat(folder).st_dev
    for parent, folders, _ in os.walk(folder):
        for name in folders:
            path = Path(parent, name)
            if os.lstat(path).st_dev != device or os.path.ismount(path):
                return path
    return None


def _check_no_mount(output: Output, target: Path) -> None:
    mount = mount_inside(target) if output.kind == FOLDER else None
    if mount is not None:
        raise UserError(f"{output.flag} {output.path}: {mount} is a mount point inside it; a folder output is "
                        "replaced whole, which must not move or delete what another file system holds: unmount it "
                        f"or choose another {output.flag}")


TRAINER_CHECKPOINTS = "checkpoint-*"  # what the HF Trainer's checkpoint rotation deletes in OUTPUT_DIR
_TRAINER_CHECKPOINT = re.compile(r"checkpoint-\d+")


def _check_workdir_entries(output: Output, target: Path, stage: str) -> None:
    """The HF Trainer deletes every `checkpoint-*` folder of OUTPUT_DIR beyond --save_total_limit and writes into
    `checkpoint-N`: only the checkpoints of a folder our training marked are ours. Refused even with
    --overwrite_output, which never removes the user's files."""
    if output.kind != WORKDIR or _lstat(target) is None:
        return
    manifest = read_our_manifest(target, output.manifest)
    ours = manifest is not None and same_stage(manifest["stage"], stage)
    theirs = sorted(path.name for path in target.glob(TRAINER_CHECKPOINTS)
                    if path.is_dir() and not (ours and _TRAINER_CHECKPOINT.fullmatch(path.name)))
    if theirs:
        raise UserError(f"{output.flag} {output.path} holds {', '.join(theirs)}, which training did not write there; "
                        "the trainer's checkpoint rotation deletes checkpoint-* folders: move them away, or choose "
                        f"another {output.flag}")


def _check_ownership(output: Output, target: Path, stage: str) -> None:
    """Refuse an existing output that this stage did not write (the caller skips this with --overwrite_output)."""
    shown = f"{output.flag} {output.path}"
    if output.kind == FILE:
        _check_file_ownership(output, target, stage, shown)
    if output.kind == APPEND or output.kind == FILE or _lstat(target) is None:
        return
    if not any(target.iterdir()):
        return  # empty: nothing in it to lose (our temporaries and lock are its siblings, never inside)
    manifest = read_our_manifest(target, output.manifest)
    if manifest is None:
        raise UserError(f"{shown}: the folder exists and this toolkit did not write it (no {output.manifest} of "
                        f"ours); choose another folder, or {OVERWRITE_HINT}")
    if not same_stage(manifest["stage"], stage):
        raise UserError(f"{shown}: the folder was written by another stage ({manifest['stage']}, says its "
                        f"{output.manifest}), not by {stage}; choose another folder, or {OVERWRITE_HINT}")


def _check_file_ownership(output: Output, target: Path, stage: str, shown: str) -> None:
    if _lstat(target) is not None:
        writer = _file_writer(target)
        if writer is None:
            raise UserError(
                f"{shown}: the file exists and this toolkit did not write it (or it was changed since: no matching "
                f"{manifest_path_for(target).name}); choose another file name, or pass --overwrite_output true to "
                "replace it"
            )
        if not same_stage(writer, stage):
            raise UserError(f"{shown}: the file was written by another stage ({writer}, says its manifest), not by "
                            f"{stage}; choose another file name, or pass --overwrite_output true to replace it")
    if _manifest_is_users(target):
        manifest_file = manifest_path_for(target)
        raise UserError(
            f"{manifest_file}: this toolkit did not write it about {target.name}, and it is the manifest path of "
            f"{shown}; move it away, or pass --overwrite_output true (it is then kept as {manifest_file.name}.user)"
        )


@contextlib.contextmanager
def claim_outputs(inputs: dict[str, str], outputs: list[Output], stage: str, overwrite: bool, lock: bool = True):
    """The output rule (see the module docstring), for every stage before it writes: yields {flag: the path to write,
    links followed}, which the stage passes to the writers. The outputs (files and folders) are locked for the block
    (`lock` False: another process of the run holds them), and the writers re-check before they rename that each is
    still what was checked here.

    `inputs` maps a flag to a path the run reads (empty: none); with `overwrite` (--overwrite_output true) an
    existing output of the user's is written anyway, but nothing of the user's in a folder is removed.
    """
    targets = {output.flag: write_target(output.path, output.flag) for output in outputs}
    with contextlib.ExitStack() as held:
        try:
            for output in outputs:
                _check_shape(output, targets[output.flag])
                _check_no_mount(output, targets[output.flag])
            _check_apart(outputs, targets, inputs)
            for output in outputs:
                _claim(output, targets[output.flag], stage, overwrite, lock, held)
        except OSError as error:  # a file of the user's we may not read, a folder we may not list
            raise path_error(Path(error.filename or "an output"), error) from None
        yield targets


def _claim(output: Output, target: Path, stage: str, overwrite: bool, lock: bool, held: contextlib.ExitStack):
    if lock and output.kind != APPEND:
        try:
            held.enter_context(folder_lock(target, output.flag))
        except OSError as error:  # the lock beside the output cannot be made: neither can the output
            raise write_error(Path(output.path), error) from None
    if output.kind == FILE:
        _finish_interrupted_swap(target)
    _check_workdir_entries(output, target, stage)
    if not overwrite:
        _check_ownership(output, target, stage)
    if output.kind in (FILE, FOLDER):
        _CLAIMED[target] = _identity(target)
        _CLAIMED_NAMES[_as_named(output.path)] = target
        held.callback(_CLAIMED.pop, target, None)
        held.callback(_CLAIMED_NAMES.pop, _as_named(output.path), None)


def _as_named(path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _still_as_claimed(path: Path, shown) -> None:
    """The output is still what claim_outputs checked (the same file or folder, or still nothing, and reached by
    the same links)."""
    if _CLAIMED_NAMES.get(_as_named(shown), path) != path or (path in _CLAIMED and _identity(path) != _CLAIMED[path]):
        raise UserError(f"{shown}: changed since this run checked it (something was put there or replaced "
                        "meanwhile); nothing was written: check it and run again")


def _claimed_now(path: Path) -> None:
    if path in _CLAIMED:
        _CLAIMED[path] = _identity(path)


# ---------------------------------------------------------------------------------------------------- writers


def _mode_of(path: Path) -> int | None:
    status = _lstat(path)
    return stat.S_IMODE(status.st_mode) if status is not None else None


def _create_file(path: Path, mode: int | None):
    """A new file at `path`, with `mode` from the start (a private output is never readable while written), or the
    default mode (0666 less the umask) for a new output."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600 if mode is not None else 0o666)
    if mode is not None:
        os.fchmod(fd, mode)
    return fd


def _write_whole(path: Path, data: bytes, mode: int | None) -> None:
    fd = _create_file(path, mode)
    with open(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", manifest=None):
    """Open a temporary sibling of `path` (its link target, if a link) for writing, with the old file's mode; rename
    it over the file only if the block succeeds.

    With `manifest`, a function of the finished temporary file's path that returns the manifest, the file and its
    manifest (`manifest_path_for(path)`) are one unit: both are complete before either is renamed; the file is
    renamed first, then its manifest over the old one, so the old file always keeps its manifest, and a run stopped
    between the two renames leaves the new manifest complete beside it (claim_outputs puts it in place).
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
    renamed = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept_mode = _mode_of(path)
        with open(_create_file(temporary, kept_mode), mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if manifest is not None:
            record = manifest(temporary)
            text = json.dumps(record, ensure_ascii=False, indent=2, default=str) + "\n"
            _write_whole(manifest_temporary, text.encode("utf-8"), _mode_of(temporary))  # private stays private
        _still_as_claimed(path, shown)
        if manifest is not None and _manifest_is_users(path):
            _set_aside(manifest_file)
        os.replace(temporary, path)
        _claimed_now(path)
        if manifest is not None:
            renamed = True  # from here on, the manifest temporary describes the file: kept for the next claim
            os.replace(manifest_temporary, manifest_file)
            _remove_legacy_manifest(path)
    except OSError as error:
        raise write_error(shown, error) from None
    finally:
        _remove_quietly(temporary)
        if not renamed:
            _remove_quietly(manifest_temporary)


def _remove_legacy_manifest(target: Path) -> None:
    """Once a file has its manifest under its own name, the one earlier versions wrote about it goes."""
    legacy = legacy_manifest_path_for(target)
    if legacy != manifest_path_for(target) and _describes(_read_manifest(legacy), target, shared_name=True):
        legacy.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")


def append_to_file(path: str | os.PathLike, text: str) -> None:
    """Append `text` to the file at `path` (its link target, if a link) in place, so that its links, hard links and
    mode stay; a line is started first if the file does not end with one. A failed write is cut back off, so the
    file never keeps half of it. Only regular files of UTF-8 text: a FIFO, a device or a folder is refused in one
    line."""
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
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse_kind(shown, mode, "a regular file")
        size = os.fstat(fd).st_size
        _require_utf8_end(fd, size, shown)
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


def _require_utf8_end(fd: int, size: int, shown: Path) -> None:
    """A file whose end is not UTF-8 text (a binary file, or one cut inside a character) cannot take rows; only the
    last bytes are read, so a long log is not read whole at each append."""
    tail = os.pread(fd, 4096, max(0, size - 4096))
    start = 0 if size <= 4096 else next((i for i, byte in enumerate(tail[:4]) if byte & 0xC0 != 0x80), 0)
    try:
        tail[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{shown} is not UTF-8 text (byte {size - len(tail) + start + error.start}), so rows cannot "
                        "be appended to it; choose another file") from None


def write_workdir_manifest(folder: str | os.PathLike, manifest: dict, manifest_name: str = FOLDER_MANIFEST) -> None:
    """Mark a folder written in place (WORKDIR) as the stage's with this run's manifest, so that later runs may write
    (and resume) there; a file of the user's under the manifest's name is kept as NAME.user."""
    manifest_file = write_target(folder) / manifest_name
    existing = _read_manifest(manifest_file)
    if _lstat(manifest_file) is not None and not (existing and same_stage(existing["stage"], manifest["stage"])):
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


def _ours_in(previous: Path, folder: Path, manifest_name: str, stage: str) -> set[str]:
    """The entries of the old folder that this stage wrote: listed in a manifest of the same stage with the sha256
    they still have. Earlier versions listed names only: such a name counts as ours where the new folder writes it
    again (the old weights are replaced, not kept as NAME.user at each upgrade); any other is the user's."""
    manifest = read_our_manifest(previous, manifest_name)
    if manifest is None or not same_stage(manifest["stage"], stage):
        return set()
    listed = manifest.get("files")
    ours = {manifest_name}
    if isinstance(listed, list):
        return ours | {name for name in listed if isinstance(name, str) and _lstat(folder / name) is not None}
    listed = listed if isinstance(listed, dict) else {}
    for entry in previous.iterdir():
        recorded = listed.get(entry.name)
        if isinstance(recorded, str) and _digest(entry) == recorded:
            ours.add(entry.name)
    return ours


def _carry_over(previous: Path, folder: Path, manifest_name: str, stage: str) -> list[str]:
    """Link the entries of `previous` that this stage did not write (the user's) into `folder`; returns them.
    One whose name the new output also has is kept as NAME.user."""
    ours = _ours_in(previous, folder, manifest_name, stage)
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


def _refuse_mount(path: Path, shown: Path) -> None:
    mount = mount_inside(path)
    if mount is not None:
        raise UserError(f"{shown}: {mount} is a mount point inside it; a folder output is replaced whole, which must "
                        "not move or delete what another file system holds: unmount it or choose another folder")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, manifest_name: str = FOLDER_MANIFEST):
    """Yield a temporary folder (with the old folder's mode from the start); on success it replaces `path` (its link
    target, if a link) as a whole.

    The block must write `manifest_name`, naming the stage, into the folder; the caller has claimed `path`
    (claim_outputs). Entries of the old folder that this stage did not write are carried over; nothing is lost on
    failure. A folder with a file system mounted inside is refused: nothing is ever copied across or deleted in it.
    """
    shown = Path(path)
    path = write_target(path)
    _require_folder(path, str(shown))
    _refuse_mount(path, shown)
    clean_leftovers(path)
    temporary = _temporary_sibling(path)
    previous = _temporary_sibling(path, "old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_quietly(temporary)
        kept_mode = _mode_of(path)
        temporary.mkdir(mode=0o700 if kept_mode is not None else 0o777)
        if kept_mode is not None:  # the old folder's mode from the start: a private one is never open meanwhile
            os.chmod(temporary, kept_mode)
        yield temporary
        stage = _list_files_in_manifest(temporary, manifest_name)
        _still_as_claimed(path, shown)
        _refuse_mount(path, shown)
        carried = _carry_over(path, temporary, manifest_name, stage) if path.is_dir() else []
        if path.is_dir():
            os.replace(path, previous)
        os.replace(temporary, path)
        _claimed_now(path)
        if carried:
            print(f"kept in {shown}/ the entries this toolkit did not write: {', '.join(carried)}")
    except OSError as error:
        raise write_error(shown, error) from None
    except Exception as error:  # a library's own error for a full disk: the same one line
        if not is_disk_full(error):
            raise
        raise write_error(shown, OSError(errno.ENOSPC, "No space left on device")) from None
    finally:
        _remove_quietly(temporary)
        if previous.exists() and not path.exists():  # the swap failed half-way: the old folder goes back
            with contextlib.suppress(OSError):
                os.replace(previous, path)
    if mount_inside(previous) is None:  # never delete into a file system mounted there meanwhile
        _remove_quietly(previous)


def warn_if_manifest_differs(path: str | os.PathLike) -> None:
    """A file and its manifest are one unit: say so in one line when the manifest beside `path` describes another
    file (edited by hand, or written by an interrupted older run)."""
    path = Path(path)
    found = _file_manifest(write_target(path))
    if found is None:
        return
    manifest_file, manifest = found
    claimed = _recorded_sha256(manifest)
    if not isinstance(claimed, str):
        print(f"warning: {manifest_file} has no output sha256; it does not describe {path}")
    elif claimed != sha256_file(path):
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
