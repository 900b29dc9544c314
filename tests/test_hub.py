"""The data stages against a hub: a local server (qwen_sft/localhub/server.py) that speaks the hub API and serves replicas
with the real repos' layouts, reached through huggingface_hub and datasets exactly as huggingface.co would be.

Each stage runs in a subprocess with HF_ENDPOINT set and the offline switches of the test session removed (the hub
libraries read them at import), as a user runs it.
"""

import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_script
from qwen_sft.cli import UserError
from qwen_sft.localhub.replicas import ORCA_FILE, write_pubmedqa, write_slimorca, write_stackexchange
from qwen_sft.localhub.server import HubServer

REPORTS = Path(__file__).resolve().parent / "fixtures" / "hub" / "reports.json"
ORCA, PUBMED, STACKEXCHANGE = "Open-Orca/SlimOrca", "qiaojin/PubMedQA", "HuggingFaceH4/stack-exchange-preferences"
SITE_ROWS = {
    "ai.stackexchange.com": 150, "electronics.stackexchange.com": 150, "biology.stackexchange.com": 150,
    "datascience.stackexchange.com": 100, "askubuntu.com": 100, "Stackoverflow.com": 1500,
}
OFF_TOPIC = ("Stackoverflow.com", "askubuntu.com")
B_ARGS = ["--total_samples", 400, "--shuffle_buffer", 64,
          "--ratios", "my_reports=0.01,orca=0.45,bio=0.2,ai=0.17,ic=0.17"]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    return {
        "orca_v1": write_slimorca(root / "orca_v1", 250, seed=1),
        "orca": write_slimorca(root / "orca", 300, seed=2),
        "pubmed": write_pubmedqa(root / "pubmed", labeled_rows=120, artificial_rows=30),
        "stackexchange": write_stackexchange(root / "se", SITE_ROWS, files_per_site=2, row_group_size=40),
    }


@pytest.fixture(scope="module")
def server(replicas):
    repos = {
        ORCA: [replicas["orca_v1"], replicas["orca"]],
        PUBMED: [replicas["pubmed"]],
        STACKEXCHANGE: [replicas["stackexchange"]],
    }
    with HubServer(repos) as hub:
        yield hub


@pytest.fixture
def hub(server):
    server.reset()
    yield server
    server.reset()


def run_online(script, *args, hub, tmp_path, timeout=180):
    """Run a stage against the local hub: HF_ENDPOINT set, offline switches off, a fresh hub cache per run."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / f"hf_home_{time.time_ns()}"), HF_HUB_DISABLE_XET="1")
    return subprocess.run(
        [sys.executable, str(ROOT / script), "--my_report_data_path", REPORTS, *map(str, args)],
        cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env,
    )


def manifest_of(output: Path) -> dict:
    return json.loads(output.with_name(f"{output.name}.manifest.json").read_text(encoding="utf-8"))


def option_b(tmp_path, hub, name="mix.jsonl", *args):
    output = tmp_path / name
    result = run_online("data_set_generation.py", *B_ARGS, "--output_file", output, *args, hub=hub, tmp_path=tmp_path)
    return result, output


@pytest.fixture(scope="module")
def a_from_hub(server, tmp_path_factory):
    """Option A with its default hub ids (and `--total_samples 60`): (CompletedProcess, output path)."""
    server.reset()
    folder = tmp_path_factory.mktemp("a_from_hub")
    output = folder / "a.jsonl"
    result = run_online("data_integration.py", "--total_samples", 60, "--output_file", output, hub=server,
                        tmp_path=folder)
    assert result.returncode == 0, result.stderr
    return result, output


@pytest.fixture(scope="module")
def b_from_hub(server, tmp_path_factory):
    """Option B with its default hub specs: (CompletedProcess, output path, the files the server sent)."""
    server.reset()
    folder = tmp_path_factory.mktemp("b_from_hub")
    result, output = option_b(folder, server)
    assert result.returncode == 0, result.stderr
    return result, output, list(server.sent)


def test_default_ids_of_both_options_stream_from_the_hub_reading_only_on_topic_sites(a_from_hub, b_from_hub, server):
    sources = manifest_of(a_from_hub[1])["sources"]
    assert sources["orca"]["commit_sha"] == server.repos[ORCA][-1].sha  # main
    assert sources["pubmed"]["config"] == "pqa_labeled" and sources["pubmed"]["columns"] == [
        "question", "context", "long_answer", "final_decision"]
    assert len(a_from_hub[1].read_text().splitlines()) == 60

    result, output, sent = b_from_hub
    se = manifest_of(output)["sources"]["stackexchange"]
    assert se["commit_sha"] == server.repos[STACKEXCHANGE][0].sha
    assert se["columns"] == ["question", "answers"]
    # The default names sites the replica lacks: each is a warning, not a failure.
    assert "data/stats.stackexchange.com" in se["missing_paths"]
    assert "has no data/stats.stackexchange.com; skipped" in result.stdout
    assert {path.split("/")[1] for path in se["data_files"]} == set(SITE_ROWS) - set(OFF_TOPIC)
    assert any("ai.stackexchange.com" in path for path in sent)
    assert not [path for path in sent if any(site in path for site in OFF_TOPIC)]  # zero rows from off-topic sites
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 400 and {row["source"] for row in rows} == {"my_reports", "orca", "bio", "ai", "ic"}


def test_a_revision_pin_reads_that_commit_and_a_snapshot_folder_gives_the_same_bytes(
    hub, replicas, a_from_hub, tmp_path
):
    old = hub.repos[ORCA][0].sha
    pinned = tmp_path / "pinned.jsonl"
    result = run_online("data_integration.py", "--total_samples", 60, "--sources",
                        f"orca={ORCA}@{old[:10]}/{ORCA_FILE},pubmed={PUBMED}:pqa_labeled", "--output_file", pinned,
                        hub=hub, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    orca = manifest_of(pinned)["sources"]["orca"]
    assert orca["commit_sha"] == old and orca["revision"] == old[:10] and orca["data_files"] == [ORCA_FILE]
    assert pinned.read_bytes() != a_from_hub[1].read_bytes()  # main has other rows
    # The same mix from local snapshots of those commits (no network at all): the same bytes.
    local = tmp_path / "local.jsonl"
    result = run_script("data_integration.py", "--my_report_data_path", REPORTS, "--total_samples", 60, "--sources",
                        f"orca={replicas['orca_v1']},pubmed={replicas['pubmed']}", "--output_file", local)
    assert result.returncode == 0, result.stderr
    assert local.read_bytes() == pinned.read_bytes()
    assert manifest_of(local)["sources"]["pubmed"]["kind"] == "file"  # the README's pqa_labeled config: one file


def test_option_b_from_a_snapshot_restricted_to_sites_matches_the_hub_offline(b_from_hub, replicas, tmp_path):
    se = replicas["stackexchange"]
    sites = "+".join(str(se / "data" / site) for site in SITE_ROWS if site not in OFF_TOPIC)
    # What `hf download --include README.md --include "pqa_labeled/*"` leaves: the README names three configs.
    pubmed = tmp_path / "pubmedqa"
    shutil.copytree(replicas["pubmed"] / "pqa_labeled", pubmed / "pqa_labeled")
    shutil.copy(replicas["pubmed"] / "README.md", pubmed)
    local = tmp_path / "local.jsonl"
    result = run_script(
        "data_set_generation.py", "--my_report_data_path", REPORTS, *B_ARGS, "--output_file", local, "--sources",
        f"orca={replicas['orca']},pubmed={pubmed},stackexchange={sites}+{se}/data/nope",
    )
    assert result.returncode == 0, result.stderr
    assert "data/nope: no such file, folder or glob match; skipped" in result.stdout
    assert local.read_bytes() == b_from_hub[1].read_bytes()
    files = manifest_of(local)["sources"]["stackexchange"]["files"]
    assert len(files) == 8 and not [path for path in files if any(site in path for site in OFF_TOPIC)]


def test_a_lost_stream_stops_with_one_line_and_the_rerun_continues_to_the_same_bytes(hub, b_from_hub, tmp_path):
    whole, sent = b_from_hub[1], b_from_hub[2]
    se_reads = [index for index, path in enumerate(sent) if "stack-exchange" in path and path.endswith("parquet")]

    hub.fail_after = se_reads[len(se_reads) // 2]  # every file read from half-way through StackExchange fails
    started = time.monotonic()
    result, output = option_b(tmp_path, hub, "mix.jsonl", "--network_retry_seconds", 3)
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: stackexchange: the connection to"), result.stderr
    assert "rows read" in error[0] and "run the same command again to continue" in error[0]
    assert "retry 1 in" in result.stdout  # the retries are visible
    assert not output.exists() and (tmp_path / "mix.jsonl.work" / "state.json").is_file()
    read_before = int(error[0].split(" rows read")[0].rsplit(" ", 1)[1].replace(",", ""))
    whole_read = manifest_of(whole)["sources"]["stackexchange"]["rows_read"]
    assert 0 < read_before < whole_read

    hub.reset()
    result, output = option_b(tmp_path, hub, "mix.jsonl", "--network_retry_seconds", 60)  # may differ
    assert result.returncode == 0, result.stderr
    assert "continuing the work saved in" in result.stdout
    assert output.read_bytes() == whole.read_bytes()
    assert not (tmp_path / "mix.jsonl.work").exists()
    assert manifest_of(output)["sources"]["stackexchange"]["rows_read"] == whole_read
    assert not [path for path in hub.sent if ORCA_FILE in path or "pqa_labeled" in path]  # finished sources stay done


def test_a_hanging_endpoint_fails_within_the_timeout_naming_the_ways_out(hub, tmp_path):
    hub.hang = True
    started = time.monotonic()
    result = run_online("data_integration.py", "--hub_timeout_seconds", 2, "--output_file", tmp_path / "m.jsonl",
                        hub=hub, tmp_path=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert elapsed < 30
    line = result.stderr.strip()
    assert "\n" not in line and "HF_ENDPOINT" in line and "--sources orca=/path/to/orca.jsonl" in line


def test_a_trickling_endpoint_fails_within_the_timeout_as_a_whole_request(hub, tmp_path):
    hub.trickle = True  # a byte every 2 s: no single read ever waits 3 s
    started = time.monotonic()
    result = run_online("data_integration.py", "--hub_timeout_seconds", 3, "--output_file", tmp_path / "m.jsonl",
                        hub=hub, tmp_path=tmp_path, timeout=90)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert elapsed < 20, elapsed
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no complete answer within 3 s" in lines[0] and "HF_ENDPOINT" in lines[0], lines


@pytest.mark.parametrize("status, body", [(500, b'{"error": "Internal Error"}'), (200, b"<html>not the hub</html>"),
                                          (200, b"{}"), (200, b"[1, 2]")],
                         ids=["500", "garbage", "empty object", "a list"])
def test_a_hub_that_answers_nonsense_is_one_line(hub, tmp_path, status, body):
    hub.info_answer = (status, body)
    result = run_online("data_integration.py", "--output_file", tmp_path / "m.jsonl", "--network_retry_seconds", 1,
                        hub=hub, tmp_path=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: orca: the hub at {hub.endpoint}"), result.stderr[-3000:]
    assert not (tmp_path / "m.jsonl").exists()


def test_bad_hub_specs_are_one_line_errors(hub, tmp_path):
    result = run_online("data_integration.py", "--sources", f"orca={ORCA}@0000000000,pubmed={PUBMED}",
                        "--output_file", tmp_path / "m.jsonl", hub=hub, tmp_path=tmp_path)
    assert result.returncode == 2 and "has no revision '0000000000'" in result.stderr
    result = run_online("data_integration.py", "--sources", f"orca={ORCA}/no_such_folder,pubmed={PUBMED}",
                        "--output_file", tmp_path / "m.jsonl", hub=hub, tmp_path=tmp_path)
    assert result.returncode == 2 and "none of the paths" in result.stderr and "no_such_folder" in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.jsonl").exists()


def test_max_rows_read_bounds_a_source_and_reports_an_unfillable_domain_early(replicas, tmp_path):
    every_site = replicas["stackexchange"] / "data" / "*" / "*.parquet"  # Stackoverflow.com sorts first
    output = tmp_path / "mix.jsonl"
    result = run_script(
        "data_set_generation.py", "--my_report_data_path", REPORTS, "--output_file", output,
        "--sources", f"orca={replicas['orca']},pubmed={replicas['pubmed']},stackexchange={every_site}",
        "--total_samples", 3000, "--ratios", "my_reports=0,orca=0.05,bio=0.05,ai=0.6,ic=0.3",
        "--max_rows_read", 2000, "--shuffle_buffer", 100,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    warned = next(i for i, line in enumerate(lines) if line.startswith("warning: ai: stackexchange kept"))
    stopped = next(i for i, line in enumerate(lines) if "stackexchange: stopped at MAX_ROWS_READ (2,000" in line)
    assert warned < stopped and "short of 1,800" in lines[warned]
    se = manifest_of(output)["sources"]["stackexchange"]
    assert se["rows_read"] == 2000 and se["reached_max_rows_read"] and len(se["files"]) == 12
    assert "its sources ran out: stackexchange after 2,000 rows (MAX_ROWS_READ)" in result.stdout


def test_hub_rows_draw_in_the_local_shuffle_order_and_resume_exactly_after_a_lost_stream():
    """HubRows on a `datasets` stream (no server): the order of `shuffle_buffered`, whatever the chunks it is drawn
    in, and a stream lost mid-way continues, in a new HubRows from the saved state, with the very next row."""
    from datasets import IterableDataset

    from qwen_sft.mix.hub import HubRows, HubSettings, StreamLost
    from qwen_sft.mix.reading import shuffle_buffered
    from qwen_sft.mix.schemas import SCHEMAS
    from qwen_sft.mix.sources import Source
    from qwen_sft.mix.workers import _chunks

    drop = {"at": 1700}

    def generate(shards):
        for shard in shards:
            for number in range(shard * 500, shard * 500 + 500):
                if number == drop["at"]:
                    drop["at"] = None
                    raise ConnectionError("connection reset")
                yield {"n": number}

    def hub_rows(state=None):
        stream = IterableDataset.from_generator(generate, gen_kwargs={"shards": list(range(5))})
        source = Source("stackexchange", "owner/name", SCHEMAS["stackexchange"])
        return HubRows(source, stream, {"endpoint": "test"}, 7, 50, HubSettings(timeout_s=30, retry_s=0), state)

    expected = [row["n"] for row in shuffle_buffered(({"n": n} for n in range(2500)), 7, 50)]
    first, drawn = hub_rows(), []
    with pytest.raises(StreamLost) as lost:
        for chunk in _chunks(first):
            drawn += [row["n"] for _, row, _ in chunk]
    drawn += [row["n"] for _, row, _ in lost.value.partial]
    assert 1000 < len(drawn) < 1700 and drawn == expected[: len(drawn)]
    rest = [(number, row["n"]) for chunk in _chunks(hub_rows(first.state)) for number, row, _ in chunk]
    assert rest[0][0] == len(drawn) + 1  # the stream position carries on
    assert drawn + [n for _, n in rest] == expected


@pytest.mark.parametrize("spec", ["owner/name@", "owner/name@rev/", "owner/name:cfg:x", "owner@rev"])
def test_a_malformed_source_spec_is_one_line_naming_the_syntax(spec, tmp_path, monkeypatch):
    namespace = runpy.run_path(str(ROOT / "data_integration.py"))
    monkeypatch.setattr(sys, "argv", ["data_integration.py", "--sources", f"orca={spec},pubmed={PUBMED}",
                                      "--my_report_data_path", str(REPORTS), "--output_file", str(tmp_path / "m")])
    with pytest.raises(UserError) as error:
        namespace["main"]()
    assert str(error.value) == f"orca: {spec}: file not found (nor a hub spec: owner/name[:config][@revision][/path+...])"


def test_the_hub_timeouts_are_written_once():
    """HUB_TIMEOUT_SECONDS and NETWORK_RETRY_SECONDS have their defaults in qwen_sft/defaults.py only, which both
    stage scripts name: HubSettings has none, and no package module falls back to a number of its own."""
    import dataclasses
    import re

    from qwen_sft.mix.hub import HubSettings

    assert all(field.default is dataclasses.MISSING for field in dataclasses.fields(HubSettings))
    for script in ("data_integration.py", "data_set_generation.py"):
        constants = runpy.run_path(str(ROOT / script))
        assert (constants["HUB_TIMEOUT_SECONDS"], constants["NETWORK_RETRY_SECONDS"]) == (30, 120)
    fallback = re.compile(r"""\.get\(\s*["'](HUB_TIMEOUT|NETWORK_RETRY)_SECONDS["']\s*,""")
    assert [path.name for path in (ROOT / "qwen_sft").rglob("*.py") if fallback.search(path.read_text())] == []
    assert fallback.search('cfg.get("HUB_TIMEOUT_SECONDS", 30)')  # the pattern finds the old fallback
