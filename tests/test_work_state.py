"""The mix's work folder (<OUTPUT_FILE>.work/) is data someone else may have put there: it never runs code, and a
state that does not fit is ignored with a warning (the mix starts over and succeeds)."""

import json
import os
import pickle

import pytest

from conftest import FIXTURES, run_script
from qwen_sft.cli import parse_config
from qwen_sft.mix.drawing import SourceStats
from qwen_sft.mix.plan import OPTION_A_REPORT_KEY, plan_mix
from qwen_sft.mix.work_state import WorkFolder

HUB = FIXTURES / "hub"
MIX_FLAGS = ["--my_report_data_path", HUB / "reports.json", "--sources",
             f"orca={HUB / 'slimorca.jsonl'},pubmed={HUB / 'pubmedqa_pqa_labeled.jsonl'}",
             "--ratios", "reports=0,orca=1,pubmed=0", "--total_samples", 10]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def mix(tmp_path):
    return run_script("data_integration.py", *MIX_FLAGS, "--output_file", tmp_path / "mix.jsonl", cwd=tmp_path)


def test_a_pickle_in_the_work_folder_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "mix.jsonl.work").mkdir()
    (tmp_path / "mix.jsonl.work" / "state.pickle").write_bytes(pickle.dumps(RunsCode(marker)))
    result = mix(tmp_path)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert (tmp_path / "mix.jsonl").is_file()
    assert (tmp_path / "mix.jsonl.work" / "state.pickle").is_file()  # not ours: left as it was


@pytest.fixture
def plan_and_work(tmp_path):
    import data_integration

    cfg = parse_config(vars(data_integration), [*map(str, MIX_FLAGS), "--output_file", str(tmp_path / "mix.jsonl")],
                       quiet=True)
    plan = plan_mix(cfg, OPTION_A_REPORT_KEY)
    return plan, WorkFolder(tmp_path / "mix.jsonl"), WorkFolder.fingerprint(cfg, plan)


def saved_state(plan, fingerprint: str) -> dict:
    stats = {source.key: SourceStats(read=7, warned={"orca"}) for source in plan.sources}
    stats["orca"].kept["orca"] = 1
    rows = {"stream": {"epoch": 0}, "buffer": [{"a": "é\u2028", "b": b"\x00\xff", "c": [1, None]}],
            "rng": {"bit_generator": "PCG64", "state": {"state": 2**100 + 3, "inc": 2**90 + 1},
                    "has_uint32": 0, "uinteger": 0},
            "slots": [3, 1], "number": 9,
            "hub": {"endpoint": "http://127.0.0.1:1", "repo_id": "o/n", "commit_sha": "ab", "revision": "main",
                    "data_files": ["x.parquet"], "config": None, "columns": None, "missing_paths": []}}
    return {"fingerprint": fingerprint, "done": ["reports"], "hub": {"orca": rows["hub"]}, "source": "orca",
            "rows": rows, "mixer": ([b'{"x":"\xe2\x80\xa8","source":"orca"}\n'], {b"\x00\x01\xfe"}, stats,
                                    {"orca": 1})}


def test_the_saved_state_reads_back_equal(plan_and_work):
    plan, work, fingerprint = plan_and_work
    state = saved_state(plan, fingerprint)
    work.save(state)
    assert work.load(fingerprint, plan) == {key: value for key, value in state.items() if key != "fingerprint"}
    assert work.load("another configuration", plan) is None


def forged_bodies(plan, fingerprint):
    good = json.loads(WorkFolderBody.of(saved_state(plan, fingerprint)))
    yield "[" * 100_000
    yield '{"done": 5}'
    yield json.dumps({**good, "lines": [1]})
    yield json.dumps({**good, "kept": {"nope": 1}})
    yield json.dumps({**good, "stats": {}})
    yield json.dumps({**good, "rows": {**good["rows"], "rng": {"bit_generator": "os.system"}}})
    yield json.dumps({**good, "rows": {**good["rows"], "hub": {"repo_id": 5}}})
    yield json.dumps({**good, "seen": [{"\u0000bytes": "!!"}]})
    yield json.dumps({**good, "lines": ["one", "too many"]})
    yield json.dumps({**good, "lines": ["\ud800"]})
    yield json.dumps({**good, "hub": {"orca": {"repo_id": "o/n"}}})


class WorkFolderBody:
    @staticmethod
    def of(state) -> str:
        from qwen_sft.mix.work_state import _state_to_json, _tag_bytes

        return json.dumps(_state_to_json(state), default=_tag_bytes)


def test_a_forged_state_with_the_right_fingerprint_is_ignored_with_a_warning(plan_and_work, capsys):
    plan, work, fingerprint = plan_and_work
    work.folder.mkdir()
    header = json.dumps({"format": WorkFolder.FORMAT, "fingerprint": fingerprint})
    for body in forged_bodies(plan, fingerprint):
        work.state_file.write_text(header + "\n" + body, encoding="utf-8")
        assert work.load(fingerprint, plan) is None, body[:200]
        assert f"warning: {work.state_file} cannot be read (" in capsys.readouterr().out


def test_a_garbage_state_file_leaves_the_mix_to_succeed(tmp_path):
    (tmp_path / "mix.jsonl.work").mkdir()
    (tmp_path / "mix.jsonl.work" / "state.json").write_bytes(b"x" * 100_000 + b"\x80\x05")
    result = mix(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mix.jsonl.work/state.json cannot be read (" in result.stdout
    assert (tmp_path / "mix.jsonl").is_file()
