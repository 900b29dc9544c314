"""Local snapshot folders as sources: the toolkit's own mixes inside one are not read back as rows, and a config
suffix that names nothing (`folder:cfg` without configs, `:cfg` without a folder) is one line."""

import shutil

from conftest import FIXTURES, run_script

HUB = FIXTURES / "hub"


def mix(tmp_path, orca: str, output: str):
    return run_script("data_integration.py", "--my_report_data_path", HUB / "reports.json", "--sources",
                      f"orca={orca},pubmed={HUB / 'pubmedqa_pqa_labeled.jsonl'}", "--total_samples", 10,
                      "--output_file", output, cwd=tmp_path)


def snapshot_folder(tmp_path):
    folder = tmp_path / "orca"
    folder.mkdir()
    shutil.copy(HUB / "slimorca.jsonl", folder / "oo-labeled_correct.gpt4.sharegpt.jsonl")  # SlimOrca's file name
    return folder


def test_a_mix_written_into_a_snapshot_folder_is_not_read_back_as_its_rows(tmp_path):
    snapshot_folder(tmp_path)
    first = mix(tmp_path, "orca", "mix.jsonl")
    assert first.returncode == 0, first.stderr
    inside = mix(tmp_path, "orca", "orca/mix.jsonl")
    assert inside.returncode == 0, inside.stderr
    again = mix(tmp_path, "orca", "mix.jsonl")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (f"orca: skipped mix.jsonl, mix.jsonl.manifest.json in {tmp_path / 'orca'}: written by this toolkit"
            in again.stdout)
    assert (tmp_path / "mix.jsonl").read_bytes() == (tmp_path / "orca" / "mix.jsonl").read_bytes()


def test_a_config_suffix_that_names_nothing_is_one_line(tmp_path):
    snapshot_folder(tmp_path)
    for spec, message in (("orca:foo", "orca: orca:foo names a config, but orca declares none"),
                          (":cfg", "orca: ':cfg' names a config but no folder; give FOLDER:cfg")):
        result = mix(tmp_path, spec, "mix.jsonl")
        assert result.returncode == 2, result.stdout[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
        assert not (tmp_path / "mix.jsonl").exists()
