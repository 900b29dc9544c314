"""Generated attacks on the output rule: random trees of folders, files, symlinks, hard links, FIFOs, manifests of
each stage, forged manifests and lock-path squatters, claimed and written as each stage does (claim_outputs, then
atomic_file, atomic_directory, write_workdir_manifest or append_to_file).

Promised for every tree: the outcome is success or one line (a UserError, exit 2 in a script), and no byte of
anything the stage did not write changes: a refused run changes nothing; a run that writes replaces only its own
earlier output (or, with --overwrite_output, the output file the user named), keeps every entry of the user's in a
replaced folder (as NAME.user where the new output has the name), appends in place, and leaves no temporary or
lock behind. A tree with nothing in the way must succeed, so a rule that refused everything would fail here.
"""

import hashlib
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ORCA, PUBMED, REPORTS, run_script
from qwen_sft.artifacts import (
    APPEND,
    FILE,
    FOLDER,
    WORKDIR,
    Output,
    append_to_file,
    atomic_directory,
    atomic_file,
    claim_outputs,
    sha256_file,
    write_workdir_manifest,
)
from qwen_sft.cli import UserError

# stage -> (manifest stage, outputs as (flag, slot, kind, manifest name), inputs as flag -> slot)
STAGES = {
    "mix": ("data_integration", [("--output_file", "out", FILE, None)], {"--my_report_data_path": "in"}),
    "inference": ("inference", [("--output_file", "out", FILE, None)],
                  {"--adapter_dir": "indir", "--instruction_file": "in"}),
    "evaluate": ("evaluate", [("--output_dir", "out", FOLDER, "metrics.json")],
                 {"--adapter_dir": "indir", "--dataset_path": "in"}),
    "export": ("export", [("--output_dir", "out", FOLDER, "manifest.json")], {"--adapter_dir": "indir"}),
    "train": ("train", [("--adapter_dir", "out", FOLDER, "manifest.json"),
                        ("--output_dir", "out2", WORKDIR, "manifest.json")], {"--dataset_path": "in"}),
    "chat": ("chat", [("/save", "out", APPEND, None)], {"--adapter_dir": "indir"}),
}
MANIFEST_STAGES = ["data_integration", "data_set_generation", "inference", "evaluate", "export", "train", "chat"]
SLOTS = ["out", "out2", "in", "indir", "other"]
# .git: a folder of hidden entries is not empty; checkpoint-*: what the trainer's rotation deletes in a WORKDIR
ENTRY_NAMES = ["model.safetensors", "notes.txt", "manifest.json", "metrics.json", "sub", ".git", "checkpoint-1",
               "checkpoint-1-good"]
NEW_FOLDER_FILES = {"model.safetensors": b"NEW WEIGHTS", "config.json": b"{}"}
STALE_LOCK = json.dumps({"pid": 999999999, "host": "gone", "started": "x"}).encode()

data = st.binary(min_size=0, max_size=12)
# A special file outside the tree, made by the test: never the machine's own /dev/null, which a defect in the rule
# (as root) could replace.
OUTSIDE_SPECIAL = "../outside.fifo"
link_targets = st.sampled_from(["out", "out2", "in", "indir", "other", "indir/inner", "out/notes.txt", "nowhere",
                                OUTSIDE_SPECIAL, "loop"])
entries = st.dictionaries(st.sampled_from(ENTRY_NAMES), st.one_of(data, st.just("dir")), max_size=3)
manifest_records = st.one_of(st.none(), st.just("names"), st.just("wrong sha256"))
folders = st.fixed_dictionaries({
    "kind": st.just("folder"), "ours": st.one_of(st.none(), st.sampled_from(MANIFEST_STAGES)),
    "forged": st.tuples(st.sampled_from(MANIFEST_STAGES), manifest_records), "entries": entries,
    "tamper": st.booleans(), "mode": st.sampled_from([0o755, 0o700]),
})
missing = st.fixed_dictionaries({"kind": st.just("missing")})
files = st.fixed_dictionaries({"kind": st.just("file"), "data": data, "mode": st.sampled_from([0o644, 0o600]),
                               "ours": st.one_of(st.none(), st.sampled_from(MANIFEST_STAGES))})
slots = st.one_of(
    missing,
    files,
    st.fixed_dictionaries({"kind": st.just("fifo")}),
    st.fixed_dictionaries({"kind": st.just("symlink"), "to": link_targets}),
    st.fixed_dictionaries({"kind": st.just("hardlink"), "to": st.sampled_from(SLOTS)}),
    folders,
)
squatters = st.one_of(st.just("missing"), st.sampled_from(["user file", "forged manifest", "symlink", "folder",
                                                             "fifo", "stale lock", "hard link", "empty file"]))
# The inputs are mostly plain (a file, a folder), so that trees with nothing in the way come up often.
layouts = st.fixed_dictionaries({"out": slots, "out2": slots, "in": st.one_of(files, slots),
                                 "indir": st.one_of(folders, slots), "other": slots})
inputs_moved = st.dictionaries(st.sampled_from(["in", "indir"]),
                               st.sampled_from(["out", "out/notes.txt", "out2", "indir", "other", "indir/inner"]),
                               max_size=1)


@dataclass
class Tree:
    root: Path
    ours_entries: dict[str, tuple[str, set]] = field(default_factory=dict)  # slot -> (stage, pristine entries)
    stale_locks: set = field(default_factory=set)


def make_file(path: Path, content: bytes, mode: int = 0o644) -> None:
    path.write_bytes(content)
    path.chmod(mode)


def file_manifest(stage: str, path: Path):
    return lambda written: {"stage": stage, "output": {"path": str(path), "sha256": sha256_file(written)}}


def build_folder(tree: Tree, slot: str, spec: dict) -> None:
    path = tree.root / slot
    if spec["ours"]:
        with atomic_directory(path) as temporary:
            for name, content in spec["entries"].items():
                if name != "manifest.json":
                    write_entry(temporary / name, content)
            (temporary / "manifest.json").write_text(json.dumps({"stage": spec["ours"]}))
        pristine = {entry.name for entry in path.iterdir()}
        if spec["tamper"] and len(pristine) > 1:
            changed = min(pristine - {"manifest.json"})
            if (path / changed).is_file():
                (path / changed).write_bytes(b"changed by the user")
                pristine.discard(changed)
        tree.ours_entries[slot] = (spec["ours"], pristine)
        (path / "mine.txt").write_bytes(b"the user's, added later")
    else:
        path.mkdir()
        for name, content in spec["entries"].items():
            write_entry(path / name, content)
        stage, record = spec["forged"]
        if record is not None and "manifest.json" not in spec["entries"]:
            files = list(spec["entries"]) if record == "names" else {name: "0" * 64 for name in spec["entries"]}
            (path / "manifest.json").write_text(json.dumps({"stage": stage, "files": files}))
    path.chmod(spec["mode"])


def write_entry(path: Path, content) -> None:
    if content == "dir":
        path.mkdir()
        (path / "inner.txt").write_bytes(b"inner")
    else:
        path.write_bytes(content)


def build(root: Path, layout: dict, manifest_squatter: str, lock_squatters: dict) -> Tree:
    tree = Tree(root)
    for slot in SLOTS:
        spec = layout[slot]
        path = root / slot
        if spec["kind"] == "file":
            if spec["ours"]:
                with atomic_file(path, "wb", manifest=file_manifest(spec["ours"], path)) as handle:
                    handle.write(spec["data"])
            else:
                make_file(path, spec["data"])
            path.chmod(spec["mode"])
        elif spec["kind"] == "fifo":
            os.mkfifo(path)
        elif spec["kind"] == "symlink":
            target = spec["to"]
            if target == OUTSIDE_SPECIAL and not (root / target).exists():
                os.mkfifo(root / target)
            path.symlink_to(slot if target == "loop" else root / target)
        elif spec["kind"] == "folder":
            build_folder(tree, slot, spec)
    for slot in SLOTS:  # hard links last, to the files made above
        spec = layout[slot]
        if spec["kind"] == "hardlink" and (root / spec["to"]).is_file() and not (root / spec["to"]).is_symlink():
            os.link(root / spec["to"], root / slot)
    squat(tree, root / "out.manifest.json", manifest_squatter)
    for slot, squatter in lock_squatters.items():
        squat(tree, root / f".{slot}.lock", squatter)
    return tree


def squat(tree: Tree, path: Path, squatter: str) -> None:
    if squatter != "missing" and os.path.lexists(path):
        path.unlink()  # a manifest of ours that build wrote: the squatter takes its place
    if squatter == "user file":
        path.write_bytes(b"the user's")
    elif squatter == "empty file":
        path.write_bytes(b"")
    elif squatter == "forged manifest":
        path.write_text(json.dumps({"stage": "export", "output": {"sha256": "0" * 64}}))
    elif squatter == "symlink":
        path.symlink_to(tree.root / "other")
    elif squatter == "folder":
        path.mkdir()
    elif squatter == "fifo":
        os.mkfifo(path)
    elif squatter == "stale lock":
        path.write_bytes(STALE_LOCK)
        tree.stale_locks.add(path.name)
    elif squatter == "hard link" and (tree.root / "other").is_file() and not (tree.root / "other").is_symlink():
        os.link(tree.root / "other", path)


def snapshot(root: Path) -> dict:
    """Every path under `root`, links not followed: a file's bytes, mode and inode, a link's target, a folder's mode."""
    tree = {}
    for folder, names, files in os.walk(root):
        for name in names + files:
            path = Path(folder) / name
            status = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISREG(status.st_mode):
                tree[key] = ("file", path.read_bytes(), stat.S_IMODE(status.st_mode), status.st_ino)
            elif stat.S_ISLNK(status.st_mode):
                tree[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(status.st_mode):
                tree[key] = ("dir", stat.S_IMODE(status.st_mode))
            else:
                tree[key] = ("other", stat.S_IFMT(status.st_mode))
    return tree


def content(entry):
    """What a snapshot entry holds, without its inode (a carried-over file may be a copy)."""
    return entry[:3] if entry[0] == "file" else entry


def subtree(tree: dict, prefix: str) -> dict:
    return {key[len(prefix) + 1:]: content(value) for key, value in tree.items() if key.startswith(prefix + "/")}


def write_as_stage(stage: str, outputs: list[Output]) -> None:
    manifest_stage = STAGES[stage][0]
    for output in outputs:
        if output.kind == FILE:
            with atomic_file(output.path, "wb", manifest=file_manifest(manifest_stage, output.path)) as handle:
                handle.write(b"NEW")
        elif output.kind == FOLDER:
            with atomic_directory(output.path, output.manifest) as temporary:
                for name, value in NEW_FOLDER_FILES.items():
                    (temporary / name).write_bytes(value)
                (temporary / output.manifest).write_text(json.dumps({"stage": manifest_stage}))
        elif output.kind == WORKDIR:
            write_workdir_manifest(output.path, {"stage": manifest_stage}, output.manifest)
        else:
            append_to_file(output.path, "ROW\n")


def utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def relative_target(root: Path, slot: str) -> str | None:
    """The slot's path after links, relative to the root; None outside it (OUTSIDE_SPECIAL) or for a loop."""
    try:
        target = (root / slot).resolve()
    except RuntimeError:
        return None
    real_root = root.resolve()
    return str(target.relative_to(real_root)) if target.is_relative_to(real_root) else None


def same(recorded, stage) -> bool:
    mix = {"data_integration", "data_set_generation"}
    return recorded == stage or {recorded, stage} <= mix


def names_stage(entry, stage: str) -> dict | None:
    """The manifest a snapshot entry holds when it is a file of JSON naming `stage`, else None."""
    if entry is None or entry[0] != "file":
        return None
    try:
        manifest = json.loads(entry[1])
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) and same(manifest.get("stage"), stage) else None


def about(entry, target: str) -> bool:
    """Whether a snapshot entry is a manifest of this toolkit (any stage) about the output `target`: replaced with
    it; anything else at the manifest path is the user's."""
    if entry is None or entry[0] != "file":
        return False
    try:
        manifest = json.loads(entry[1])
    except ValueError:
        return False
    if not (isinstance(manifest, dict) and isinstance(manifest.get("stage"), str)):
        return False
    output = manifest.get("output")
    path = output.get("path") if isinstance(output, dict) else None
    return Path(path).name == Path(target).name if isinstance(path, str) else True


def file_is_ours(before: dict, target: str, stage: str) -> bool:
    manifest = names_stage(before.get(target + ".manifest.json"), stage)
    entry = before.get(target)
    return bool(manifest and entry and entry[0] == "file" and about(before[target + ".manifest.json"], target)
                and manifest.get("output", {}).get("sha256") == hashlib.sha256(entry[1]).hexdigest())


def foreign_checkpoints(before: dict, target: str, manifest_name: str) -> list:
    """The checkpoint-* folders of a WORKDIR that training did not write: all of them unless our training marked
    the folder, else those not named checkpoint-N."""
    ours = names_stage(before.get(f"{target}/{manifest_name}"), "train")
    return [key for key, value in before.items() if key.startswith(target + "/checkpoint-") and value[0] == "dir"
            and "/" not in key[len(target) + 1:] and not (ours and re.fullmatch(r"checkpoint-\d+", Path(key).name))]


def nothing_in_the_way(tree: Tree, before: dict, layout, stage, lock_squatters, moved) -> bool:
    """A tree where the stage must succeed: its outputs missing or its own pristine ones, nothing squatting."""
    manifest_stage, outputs, _ = STAGES[stage]
    if moved or any(value not in ("missing", "stale lock") for value in lock_squatters.values()):
        return False
    if layout["in"]["kind"] not in ("missing", "file") or layout["indir"]["kind"] not in ("missing", "folder"):
        return False
    for _, slot, kind, manifest_name in outputs:
        spec = layout[slot]
        if kind == FILE:
            clean = (spec["kind"] == "missing" and slot + ".manifest.json" not in before) or \
                (spec["kind"] == "file" and file_is_ours(before, slot, manifest_stage))
        elif kind == APPEND:  # a file that ends in UTF-8 text, which rows may follow
            clean = spec["kind"] == "missing" or (spec["kind"] == "file" and utf8(spec["data"]))
        else:
            stage_written, pristine = tree.ours_entries.get(slot, (None, set()))
            clean = spec["kind"] == "missing" or (spec["kind"] == "folder" and same(stage_written, manifest_stage)
                                                  and manifest_name in pristine
                                                  and not (kind == WORKDIR and foreign_checkpoints(
                                                      before, slot, manifest_name)))
        if not clean:
            return False
    return True


def must_refuse(tree: Tree, before: dict, stage: str, inputs: dict, overwrite: bool) -> str | None:
    """Why the rule must refuse this tree, or None: the spec, written apart from the code under test."""
    manifest_stage, outputs, _ = STAGES[stage]
    sources = [relative_target(tree.root, path) for path in inputs.values()]  # None: a loop, or OUTSIDE_SPECIAL
    targets = [relative_target(tree.root, slot) for _, slot, _, _ in outputs]
    if None in targets:
        return "a loop of links or a device"
    if len(targets) == 2 and (targets[0] == targets[1] or targets[0].startswith(targets[1] + "/")
                              or targets[1].startswith(targets[0] + "/")):
        return "nested outputs"
    for (_, _slot, kind, manifest_name), target in zip(outputs, targets):
        entry = before.get(target)
        if entry and (entry[0] == "other" or (entry[0] == "dir") != (kind in (FOLDER, WORKDIR))):
            return "a FIFO, or a file where a folder goes (or the reverse)"
        written = [target, target + ".manifest.json"] if kind == FILE else [target]
        for source in filter(None, sources):
            held = before.get(source)
            same_inode = entry and held and entry[0] == held[0] == "file" and entry[3] == held[3]
            if source in written or same_inode or (held and held[0] == "dir" and any(
                    path.startswith(source + "/") for path in written)) or (kind == FOLDER and source.startswith(
                    target + "/")):
                return "an output over an input"
        manifest = before.get(target + ".manifest.json") if kind == FILE else None
        if manifest and manifest[0] != "file":
            return "a manifest path that is not a file"
        lock = before.get(str(Path(target).with_name(f".{Path(target).name}.lock")))
        if kind != APPEND and lock and not (lock[0] == "file" and lock[1] == STALE_LOCK):
            return "a lock path taken (an empty file too: never ours)"
        if kind == WORKDIR and foreign_checkpoints(before, target, manifest_name):
            return "checkpoint folders the trainer would delete (even with --overwrite_output)"
        if overwrite:
            continue
        if kind == FILE and ((entry and not file_is_ours(before, target, manifest_stage))
                             or (manifest and not about(manifest, target))):
            return "the user's file or manifest"
        children = [key for key in before if key.startswith(target + "/") and "/" not in key[len(target) + 1:]]
        if kind in (FOLDER, WORKDIR) and children and \
                not names_stage(before.get(f"{target}/{manifest_name}"), manifest_stage):
            return "the user's folder or another stage's"
    return None


def entry_tree(entries: dict, name: str) -> dict:
    """An entry and everything under it, keyed relative to it."""
    return {key[len(name):]: value for key, value in entries.items() if key == name or key.startswith(name + "/")}


def check_written(tree: Tree, before: dict, after: dict, stage: str, overwrite: bool) -> set:
    """The outputs hold what the stage wrote and the user's entries in them survive; returns the paths that were
    allowed to change (everything else must be byte for byte as before)."""
    manifest_stage = STAGES[stage][0]
    changed = set()
    for _, slot, kind, manifest_name in STAGES[stage][1]:
        target = relative_target(tree.root, slot)
        assert target is not None
        old = before.get(target)
        if kind == FILE:
            assert old is None or overwrite or file_is_ours(before, target, manifest_stage), "replaced a user's file"
            assert after[target][1] == b"NEW" and (old is None or after[target][2] == old[2])  # its mode kept
            manifest = target + ".manifest.json"
            if manifest in before and not about(before[manifest], target):
                kept = [key for key in after if key.startswith(manifest + ".user")]
                assert any(content(after[key]) == content(before[manifest]) for key in kept), "lost a manifest"
            changed |= {target, manifest}
        elif kind == APPEND:
            old_bytes = old[1] if old else b""
            expected = old_bytes + (b"\n" if old_bytes and not old_bytes.endswith(b"\n") else b"") + b"ROW\n"
            assert after[target][1] == expected and (old is None or after[target][2:] == old[2:])  # in place
            changed |= {key for key, value in before.items() if old and value[0] == "file" and value[3] == old[3]}
            changed.add(target)
        else:
            check_folder(tree, before, after, slot, target, kind, manifest_name, manifest_stage)
            changed |= {target} | {key for key in before if key.startswith(target + "/")}
    return changed


def check_folder(tree, before, after, slot, target, kind, manifest_name, manifest_stage) -> None:
    old_entries, new_entries = subtree(before, target), subtree(after, target)
    if target in before:
        assert after[target] == before[target]  # the folder keeps its mode
    if kind == FOLDER:
        for name, value in NEW_FOLDER_FILES.items():
            assert new_entries[name][:2] == ("file", value)
    stage_written, pristine = tree.ours_entries.get(target, (None, set()))
    ours = pristine if same(stage_written, manifest_stage) else set()
    if names_stage(before.get(f"{target}/{manifest_name}"), manifest_stage):
        ours = ours | {manifest_name}  # a manifest naming this stage is ours (an older version's or a forger's)
    for name in {key.split("/")[0] for key in old_entries}:
        if name in ours and (kind == FOLDER or name == manifest_name):
            continue  # ours: replaced (a WORKDIR's manifest by this run's)
        may_move = kind == FOLDER or name == manifest_name
        candidates = [name + ".user" * count for count in range(4)] if may_move else [name]
        assert any(entry_tree(old_entries, name) == entry_tree(new_entries, kept) for kept in candidates), \
            f"lost {name} of {target}"


def run_case(tmp_path: Path, stage: str, layout, manifest_squatter, lock_squatters, moved, overwrite) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    tree = build(root, layout, manifest_squatter, lock_squatters)
    manifest_stage, specs, input_slots = STAGES[stage]
    outputs = [Output(flag, root / slot, kind, manifest or "manifest.json") for flag, slot, kind, manifest in specs]
    inputs = {flag: str(root / moved.get(slot, slot)) for flag, slot in input_slots.items()}
    before = snapshot(root)
    must_succeed = nothing_in_the_way(tree, before, layout, stage, lock_squatters, moved)
    try:
        with claim_outputs(inputs, outputs, manifest_stage, overwrite):
            write_as_stage(stage, outputs)
    except UserError as refusal:
        error = str(refusal)
        assert "\n" not in error
        refused = True
    else:
        refused, error = False, ""
    after = snapshot(root)
    assert not (refused and must_succeed), f"refused a tree with nothing in the way: {error}"
    reason = must_refuse(tree, before, stage, inputs, overwrite)
    assert refused or not reason, f"not refused: {reason}"
    changed = set() if refused else check_written(tree, before, after, stage, overwrite)
    for key, value in before.items():
        if key in changed or Path(key).name in tree.stale_locks:
            continue
        assert content(after.get(key, ("gone",))) == content(value), f"{key} changed ({'refused' if refused else 'ok'})"
    leftovers = [key for key in after if key not in before and (".partial-" in key or ".old-" in key
                                                                 or key.endswith(".lock"))]
    assert not leftovers


@pytest.mark.parametrize("stage", sorted(STAGES))
@settings(max_examples=300)
@given(layout=layouts, manifest_squatter=squatters,
       lock_squatters=st.fixed_dictionaries({"out": squatters, "out2": squatters}), moved=inputs_moved,
       overwrite=st.booleans())
def test_the_output_rule_against_random_trees(tmp_path, stage, layout, manifest_squatter, lock_squatters, moved,
                                              overwrite):
    run_case(tmp_path, stage, layout, manifest_squatter, lock_squatters, moved, overwrite)


@settings(max_examples=12)
@given(layout=st.fixed_dictionaries({"out": slots, "out2": missing, "in": missing, "indir": missing, "other": slots}),
       manifest_squatter=squatters, overwrite=st.booleans())
def test_the_mix_script_against_random_trees(tmp_path, layout, manifest_squatter, overwrite):
    """End to end: data_integration.py into a random tree exits 0 or gives one line with exit 2, and changes only
    its output and manifest (the user's manifest kept as NAME.user)."""
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    tree = build(root, layout, manifest_squatter, {})
    before = snapshot(root)
    reason = must_refuse(tree, before, "mix", {}, overwrite)
    result = run_script("data_integration.py", "--my_report_data_path", REPORTS, "--sources",
                        f"orca={ORCA},pubmed={PUBMED}", "--ratios", "reports=0,orca=1,pubmed=0", "--total_samples", 3,
                        "--output_file", root / "out", "--overwrite_output", str(overwrite).lower(), cwd=tmp_path)
    after = snapshot(root)
    if result.returncode == 2:
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
        assert after == before
        return
    assert result.returncode == 0 and not reason, (reason, result.stderr[-2000:])
    target = relative_target(root, "out")
    manifest = json.loads(after[target + ".manifest.json"][1])
    assert manifest["output"]["sha256"] == hashlib.sha256(after[target][1]).hexdigest()
    if before.get(target + ".manifest.json") and not about(before[target + ".manifest.json"], target):
        assert content(after[target + ".manifest.json.user"]) == content(before[target + ".manifest.json"])
    for key, value in before.items():
        if key not in (target, target + ".manifest.json"):
            assert content(after.get(key, ("gone",))) == content(value), key
