"""The caches (QWEN_SFT_CACHE): one that cannot be written, and a pruned or damaged llama.cpp converter (its own
gguf-py missing included), each give one line that says what to do (never `pip install gguf`)."""

import errno
import tempfile

import pytest

from qwen_sft import llama_cpp
from qwen_sft.cli import UserError
from qwen_sft.llama_cpp import CONVERTER, LLAMA_CPP_PYTHON, convert, converter_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_SFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cached_converter(cache, source: str, parts=("conversion", "gguf-py")):
    folder = cache / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    folder.mkdir(parents=True)
    (folder / CONVERTER).write_text(source, encoding="utf-8")
    for part in parts:
        (folder / part).mkdir()
    return folder


def test_a_cache_that_cannot_be_written_is_one_line(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp, "download_sdist", lambda: tmp_path / "llama.tar.gz")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(UserError, match=f"the cache {cache} cannot be written .Read-only file system.; set "
                                        "QWEN_SFT_CACHE to a writable folder"):
        converter_dir()


def test_a_pruned_cached_converter_says_to_delete_it(cache):
    folder = cached_converter(cache, "print('converter')\n", parts=("conversion",))
    with pytest.raises(UserError, match=f"{folder}: the cached llama.cpp converter lacks gguf-py/; delete that "
                                        "folder and it is unpacked again"):
        converter_dir()


@pytest.mark.parametrize("source", ["def broken(:\n", "import gguf\n", "from conversion import x\n"],
                         ids=["syntax error", "its gguf-py gone", "its conversion gone"])
def test_a_damaged_cached_converter_says_to_delete_it_not_to_pip_install(cache, tmp_path, source):
    folder = cached_converter(cache, source)
    with pytest.raises(UserError) as raised:
        convert(tmp_path, tmp_path / "model.gguf", "f32", "m")
    message = str(raised.value)
    assert f"if the cached converter is damaged, delete {folder} and it is unpacked again" in message, message
    assert "pip install" not in message


def test_a_tiny_model_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    from qwen_sft.tiny import tiny_path

    (tmp_path / "a_file").write_text("not a folder", encoding="utf-8")
    monkeypatch.setenv("QWEN_SFT_CACHE", str(tmp_path / "a_file" / "cache"))  # as a read-only mount would refuse
    with pytest.raises(UserError, match=f"the cache {tmp_path / 'a_file' / 'cache'} cannot be written .Not a "
                                        "directory.; set QWEN_SFT_CACHE to a writable folder"):
        tiny_path()
