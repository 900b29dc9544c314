"""GGUF files through llama.cpp's own converter, `convert_hf_to_gguf.py`, used as llama.cpp ships it.

The converter and its `gguf-py` come from a pinned llama.cpp: the llama-cpp-python sdist on PyPI bundles them under
`vendor/llama.cpp/`. It is fetched once with pip (so a pip mirror works), checked against its sha256 and unpacked
into the cache; `--llama_cpp_dir` points at a llama.cpp checkout instead. Nothing of it is copied into this repo.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .artifacts import sha256_file
from .cli import UserError
from .tiny import cache_not_writable, cache_root

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_PARTS = (CONVERTER, "conversion/", "gguf-py/")  # what the converter imports, under vendor/llama.cpp/
GGUF_TYPES = ("q8_0", "bf16", "f16", "f32")
NETWORK_ERRORS = r"NewConnectionError|ConnectTimeout|ReadTimeout|Name or service not known|Temporary failure in name"
PIP_NAMES = {"sentencepiece": "sentencepiece==0.2.3", "yaml": "pyyaml"}  # import name -> what to pip install


def converter_dir(llama_cpp_dir: str = "") -> Path:
    """The folder holding convert_hf_to_gguf.py: the given llama.cpp checkout, or the pinned one in the cache."""
    if llama_cpp_dir:
        folder = Path(llama_cpp_dir).expanduser()
        if not (folder / CONVERTER).is_file():  # its other parts differ between llama.cpp versions
            raise UserError(f"--llama_cpp_dir {llama_cpp_dir}: no {CONVERTER} there; give a llama.cpp checkout")
        return folder
    folder = cached_converter_dir()
    if not (folder / CONVERTER).is_file():
        try:
            unpack_converter(download_sdist(), folder)
        except OSError as error:
            raise cache_not_writable(error) from None
    missing = [part for part in CONVERTER_PARTS if not (folder / part).exists()]
    if missing:  # a cache someone pruned, or a copy cut short
        raise UserError(f"{folder}: the cached llama.cpp converter lacks {', '.join(missing)}; delete that folder "
                        "and it is unpacked again")
    return folder


def cached_converter_dir() -> Path:
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def downloads_dir() -> Path:
    """Where downloaded packages are kept: shared by every cache root (e.g. each test run's), so fetched once."""
    return Path(os.environ.get("QWEN_SFT_DOWNLOADS", Path.home() / ".cache" / "qwen_sft" / "downloads"))


def download_sdist() -> Path:
    """llama-cpp-python's sdist from the package index pip is set up for, checked against its pinned sha256."""
    target = downloads_dir()
    sdist = target / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        print(f"fetching llama.cpp's converter: pip download llama-cpp-python=={LLAMA_CPP_PYTHON} (sdist, ~77 MB)")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--dest", str(target)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not sdist.is_file():
            reason = (result.stderr.strip().splitlines() or ["no sdist was written"])[-1]
            if re.search(NETWORK_ERRORS, result.stderr):
                reason = f"the package index could not be reached: {reason}"
            raise UserError(
                f"llama.cpp's converter could not be fetched ({reason}); run `pip download --no-deps --no-binary "
                f":all: llama-cpp-python=={LLAMA_CPP_PYTHON} -d {target}` where PyPI is reachable, "
                "or pass --llama_cpp_dir /path/to/llama.cpp"
            )
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise UserError(f"{sdist}: sha256 {digest} is not the pinned llama-cpp-python {LLAMA_CPP_PYTHON}; delete it")
    return sdist


def unpack_converter(sdist: Path, folder: Path) -> None:
    """The converter, `conversion/` and `gguf-py/` of the sdist, unpacked beside `folder` and renamed into place."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                relative = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and relative.startswith(CONVERTER_PARTS) and member.isfile():
                    member.name = relative
                    archive.extract(member, staging, filter="data")
        os.replace(staging, folder)
    except OSError:
        if not (folder / CONVERTER).is_file():  # not a concurrent unpack that won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert(model_dir: Path, outfile: Path, gguf_type: str, model_name: str, llama_cpp_dir: str = "") -> None:
    """Run llama.cpp's converter on a merged model folder; a failure is one line naming what to do."""
    converter = converter_dir(llama_cpp_dir) / CONVERTER
    print(f"converting the merged model to {outfile.name} with {converter}")
    command = [sys.executable, str(converter), str(model_dir), "--outfile", str(outfile), "--outtype", gguf_type,
               "--model-name", model_name]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0 and outfile.is_file():
        return
    missing = re.search(r"No module named '([\w.]+)'", result.stderr)
    own_parts = {"gguf", "conversion"}  # the converter's own folders (gguf-py/, conversion/), not packages
    if missing and missing.group(1).split(".")[0] not in own_parts:
        name = missing.group(1).split(".")[0]
        raise UserError(f"llama.cpp's converter needs the Python package {name}: pip install {PIP_NAMES.get(name, name)}")
    last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
    raise UserError(f"llama.cpp's converter failed on {model_dir}: {last}{damaged_hint(llama_cpp_dir)}")


def damaged_hint(llama_cpp_dir: str) -> str:
    """What to do when the converter itself may be broken: the cached one is unpacked again once deleted."""
    if llama_cpp_dir:
        return f" (if {llama_cpp_dir} is damaged, check it out again)"
    return f" (if the cached converter is damaged, delete {cached_converter_dir()} and it is unpacked again)"


def gguf_package(llama_cpp_dir: str = ""):
    """The converter's own gguf-py, imported from its folder (a pip-installed gguf of another version is not it);
    registered as `gguf`, the name its modules import each other by."""
    package = converter_dir(llama_cpp_dir) / "gguf-py" / "gguf"
    if "gguf" in sys.modules and Path(sys.modules["gguf"].__file__).parent == package:
        return sys.modules["gguf"]
    spec = importlib.util.spec_from_file_location("gguf", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules["gguf"] = module
        spec.loader.exec_module(module)
    except (ImportError, OSError) as error:
        sys.modules.pop("gguf", None)
        raise UserError(f"{package} cannot be imported ({error}){damaged_hint(llama_cpp_dir)}") from None
    return module


def gguf_summary(path: Path, llama_cpp_dir: str = "") -> dict:
    """What a GGUF file says about itself, read with the converter's own gguf-py."""
    gguf = gguf_package(llama_cpp_dir)
    reader = gguf.GGUFReader(path)

    def field(name: str):
        return reader.fields[name].contents() if name in reader.fields else None

    return {
        "architecture": field("general.architecture"),
        "pre_tokenizer": field("tokenizer.ggml.pre"),
        "tokens": len(reader.fields["tokenizer.ggml.tokens"].data),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "padding_token_id": field("tokenizer.ggml.padding_token_id"),
        "chat_template": field("tokenizer.chat_template"),
        "tensors": len(reader.tensors),
    }
