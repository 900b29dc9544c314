"""Step 2 of the mix: where its rows come from, local files or streamed hub datasets (Source); reading.py and hub.py
read them, schemas.py holds each dataset's adapter.

A source is a hub dataset (streamed with `datasets`, never downloaded whole) or local data in that dataset's own
schema. Both are drawn through the same seeded shuffle buffer (the algorithm of `IterableDataset.shuffle`, replicated
in `shuffle_buffered`), so memory stays bounded by the buffer, whatever the source's size.

A hub source names a repo, and optionally a config, a revision and some of its folders or globs:

    owner/name[:config][@revision][/path[+path...]]

    qiaojin/PubMedQA:pqa_labeled                       the config declared in the README YAML
    HuggingFaceH4/stack-exchange-preferences@0b1c2d3/data/ai.stackexchange.com+data/biology.stackexchange.com
    Open-Orca/SlimOrca@main/oo-labeled_correct.gpt4.sharegpt.jsonl

A revision is a branch, tag or commit sha (without "/"); each path is a folder (all its data files) or a glob, and
"+" joins several (a comma would end the --sources item). A folder that does not exist is a warning, not a failure.
The commit a revision resolved to is recorded in the manifest; pinning it (`@<sha>`) reproduces the same rows.

A local source is a .json/.jsonl/.parquet file, a folder laid out like the hub repo (what `hf download --repo-type
dataset ... --local-dir DIR` writes; `DIR:config` picks a config of its README YAML), a glob, or several of these
joined by "+".

"""

from __future__ import annotations

import glob
import json
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..cli import UserError
from .reading import FileRow
from .schemas import Schema

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
# Names that are plainly files (so a typo gives "file not found", not a failed hub lookup).
FILE_SUFFIXES = LOCAL_SUFFIXES + (".csv", ".tsv", ".txt", ".gz", ".zip", ".arrow", ".xlsx")
HUB_SPEC = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<revision>[\w.-]+))?(?:/(?P<paths>.+))?"
)
HUB_CONFIGS = {"qiaojin/PubMedQA": "pqa_labeled"}  # hub datasets that need a config name
GLOB_CHARS = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Source:
    """One input: `key` (a SOURCES key, or the RATIOS key of the report file), its schema and where it lives."""

    key: str
    spec: str
    schema: Schema

    @cached_property
    def is_hub(self) -> bool:
        """A hub spec (owner/name...) rather than local data: a path that exists, or that ends like a data file."""
        first = self.spec.split("+")[0]
        match = HUB_SPEC.fullmatch(self.spec)
        local = (
            Path(first).exists() or Path(first.rpartition(":")[0] or first).is_dir()
            or first.startswith(("/", ".", "~")) or bool(glob.glob(first))
            or (match is not None and match["repo"].lower().endswith(FILE_SUFFIXES))
        )
        return not local and match is not None

    @cached_property
    def files(self) -> list[Path]:
        """The local data files this source names, in reading order (a UserError if there are none)."""
        return local_files(self)

    @cached_property
    def path(self) -> str | None:
        """The one local file this source reads, or None (a hub stream, or several files)."""
        return None if self.is_hub or len(self.files) != 1 else str(self.files[0])

    def where(self, number) -> str:
        """A user-facing pointer to a row: file:line for JSON, file row N for Parquet, the stream position for hub."""
        if isinstance(number, FileRow):
            return str(number)
        if self.is_hub:
            return f"{self.spec} (streamed row {number})"
        if self.path.lower().endswith(".parquet"):
            return f"{self.path} row {number}"
        return f"{self.path}:{number}"


def warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stdout)  # above a progress bar, not inside it


def _folder_files(source: Source, folder: Path, config: str | None) -> list[Path]:
    """The train files of a folder laid out like a hub repo, as `datasets` finds them: the config's `data_files` in
    the README YAML, else files named by split (train-00000-of-00001.parquet) or any data file."""
    import datasets
    from datasets.data_files import DataFilesDict, sanitize_patterns
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub.repocard import metadata_load

    datasets.logging.set_verbosity_error()
    readme = folder / "README.md"
    configs = MetadataConfigs.from_dataset_card_data(metadata_load(readme) or {}) if readme.is_file() else {}
    if config is None and len(configs) > 1:
        if source.schema.config not in configs:
            raise UserError(f"{source.key}: {folder} declares configs {', '.join(configs)}; pick one: {folder}:NAME")
        config = source.schema.config
    if config is not None and not configs:
        raise UserError(f"{source.key}: {folder}:{config} names a config, but {folder} declares none (no configs in a "
                        f"README.md); drop :{config}")
    try:
        if configs:  # only the chosen config's files are resolved: a snapshot may hold only those
            config = config or next(iter(configs))
            if config not in configs:
                raise ValueError(f"no config {config!r} in its README (it has {', '.join(configs)})")
            patterns = sanitize_patterns(configs[config].get("data_files", []))
            data_files = DataFilesDict.from_patterns(patterns, base_path=str(folder))
        else:
            data_files = datasets.load_dataset_builder(str(folder)).config.data_files or {}
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as error:
        raise UserError(f"{source.key}: {folder}: not a readable dataset folder ({first_line(error)})") from None
    train = _without_our_outputs(source, [Path(name) for name in data_files.get("train") or []])
    if not train:
        problem = (f"the train files of config {config!r} are not there (download them)" if configs
                   else "no train split (file names like train-00000-of-00001.parquet)")
        raise UserError(f"{source.key}: {folder}: {problem}")
    return train


def _without_our_outputs(source: Source, files: list[Path]) -> list[Path]:
    """`files` less the mixes this toolkit wrote among them and their manifests (a mix written into a snapshot
    folder would otherwise be read back as the source's rows)."""
    ours = set()
    for path in files:
        if path.name.endswith(".manifest.json"):
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
                written = Path(manifest["output"]["path"]).name
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(manifest.get("stage"), str):
                ours |= {path, path.with_name(written)}
    if ours & set(files):
        names = ", ".join(sorted(path.name for path in ours & set(files)))
        warn(f"{source.key}: skipped {names} in {files[0].parent}: written by this toolkit, not source data")
    return [path for path in files if path not in ours]


def _local_part_files(source: Source, part: str) -> list[Path]:
    folder, colon, config = part.rpartition(":")
    if colon and not folder and not Path(part).exists():
        raise UserError(f"{source.key}: {part!r} names a config but no folder; give FOLDER:{config}")
    if colon and folder and Path(folder).is_dir():
        return _folder_files(source, Path(folder), config)
    path = Path(part).expanduser()
    if path.is_dir():
        return _folder_files(source, path, None)
    if path.is_file():
        return [path]
    return [Path(name) for name in sorted(glob.glob(str(path), recursive=True)) if Path(name).is_file()]


def local_files(source: Source) -> list[Path]:
    """Every file of a local source, checked; a part (of several) that names nothing is a warning."""
    parts = [part.strip() for part in source.spec.split("+") if part.strip()]
    files = []
    for part in parts:
        found = _local_part_files(source, part)
        if not found and len(parts) > 1:
            warn(f"{source.key}: {part}: no such file, folder or glob match; skipped")
        files += found
    if not files:
        raise UserError(
            f"{source.key}: {source.spec}: file not found (nor a hub spec: owner/name[:config][@revision][/path+...])"
        )
    for path in files:
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise UserError(f"{source.key}: {path}: unsupported file type (use .json, .jsonl or .parquet)")
    return files


def check_local_file(source: Source) -> None:
    """Fail early, with one line, on a local source that cannot be read."""
    source.files  # noqa: B018  (resolving the files checks them)



def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
