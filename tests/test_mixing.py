"""The mixing engine behind data_integration.py (Option A) and data_set_generation.py (Option B), run on small local
files in the hub datasets' own schemas (tests/fixtures/hub/)."""

import hashlib
import json
import re
import runpy
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, one_line_error, run_script
from qwen_sft.artifacts import sha256_file
from qwen_sft.cli import UserError
from qwen_sft.mix.plan import exact_quotas
from qwen_sft.mix.reading import shuffle_buffered
from qwen_sft.mix.rows import (
    count_keyword_hits,
    duplicate_key,
    keyword_patterns,
    mix_line,
    parse_json_line,
)
from qwen_sft.mix.schemas import SCHEMAS, StackExchangeSchema, WrongSchema, html_to_text

HUB = Path(__file__).resolve().parent / "fixtures" / "hub"
ORCA = HUB / "slimorca.jsonl"
PUBMED = HUB / "pubmedqa_pqa_labeled.jsonl"
STACKEXCHANGE = HUB / "stack_exchange_preferences.jsonl"
REPORTS = HUB / "reports.json"
ORCA_UNIQUE_ROWS = 10  # 12 rows: one exact and one near-exact (case, whitespace) duplicate


def mix_in_process(script: str, *args, monkeypatch):
    """Run a stage's main() in this process with the given flags (a UserError propagates)."""
    namespace = runpy.run_path(str(ROOT / script))
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    namespace["main"]()


def with_defaults(defaults: dict, args) -> list:
    """The flags `args` plus those `defaults` they do not give (a flag may be given only once)."""
    given = {str(arg) for arg in args if str(arg).startswith("--")}
    return [item for flag, value in defaults.items() if flag not in given for item in (flag, value)] + list(args)


def option_a(tmp_path, monkeypatch, *args, output="mix.jsonl"):
    defaults = {"--my_report_data_path": REPORTS, "--sources": f"orca={ORCA},pubmed={PUBMED}",
                "--output_file": tmp_path / output}
    mix_in_process("data_integration.py", *with_defaults(defaults, args), monkeypatch=monkeypatch)
    return read_mix(tmp_path / output)


def option_b(tmp_path, monkeypatch, *args):
    defaults = {"--my_report_data_path": REPORTS,
                "--sources": f"orca={ORCA},pubmed={PUBMED},stackexchange={STACKEXCHANGE}",
                "--output_file": tmp_path / "mix.jsonl"}
    mix_in_process("data_set_generation.py", *with_defaults(defaults, args), monkeypatch=monkeypatch)
    return read_mix(tmp_path / "mix.jsonl")


def read_mix(path: Path):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    manifest = json.loads(path.with_name(f"{path.name}.manifest.json").read_text(encoding="utf-8"))
    return rows, manifest


def folded(text: str) -> str:
    return " ".join(text.lower().split())


# ---------------------------------------------------------------------------------------------------- Option A


def test_option_a_exact_counts_per_source_through_the_cli(tmp_path):
    output = tmp_path / "mix.jsonl"
    result = run_script(
        "data_integration.py", "--my_report_data_path", REPORTS, "--sources", f"orca={ORCA},pubmed={PUBMED}",
        "--total_samples", 20, "--ratios", "reports=0.25,orca=0.45,pubmed=0.3", "--output_file", output,
    )
    assert result.returncode == 0, result.stderr
    rows, manifest = read_mix(output)
    assert Counter(row["source"] for row in rows) == {"reports": 5, "orca": 9, "pubmed": 6}
    assert all(set(row) == {"instruction", "input", "output", "source"} for row in rows)
    assert all(row["instruction"].strip() and row["output"].strip() for row in rows)
    assert manifest["output"] == {"path": str(output), "rows": 20, "sha256": sha256_file(output)}
    assert manifest["sources"]["orca"]["sha256"] == sha256_file(ORCA)
    assert manifest["sources"]["orca"]["kept"] == {"orca": 9}
    assert manifest["buckets"]["pubmed"] == {"requested": 6, "delivered": 6, "sources": ["pubmed"]}
    assert manifest["config"]["TOTAL_SAMPLES"] == 20 and manifest["seed"] == 42 and manifest["shortfall"] == {}
    assert "wrote 20 rows" in result.stdout


def test_schema_adapters_produce_the_expected_records(tmp_path, monkeypatch):
    rows, _ = option_a(tmp_path, monkeypatch, "--total_samples", 20, "--ratios", "reports=0,orca=0.5,pubmed=0.5")
    by_instruction = {row["instruction"]: row for row in rows}
    # SlimOrca: the system turn leads the instruction; a row without one keeps the human turn alone.
    sky = next(row for row in rows if row["instruction"].endswith("Why is the sky blue?"))
    assert sky["instruction"].startswith("You are a helpful assistant, who always provide explanation.")
    assert sky["output"].startswith("Sunlight is made of many colours.") and sky["input"] == ""
    review = next(row for row in rows if "battery died" in row["instruction"])
    assert review["instruction"].startswith("Is the following review positive or negative?")
    # PubMedQA: the labelled abstract is the input, the verdict leads the long answer.
    fibrillation = by_instruction["Can a smartphone ECG detect atrial fibrillation in general practice?"]
    assert fibrillation["input"].startswith("BACKGROUND: Atrial fibrillation is often asymptomatic.\nMETHODS: 1,000")
    assert fibrillation["output"].startswith("Yes. Single-lead smartphone ECG screening")
    assert by_instruction["Is serum ferritin a reliable marker of iron deficiency in chronic kidney disease?"][
        "output"].startswith("No. ")


def test_quotas_follow_the_largest_remainder_method():
    assert exact_quotas(2000, {"reports": 0.1, "orca": 0.6, "pubmed": 0.3}) == {
        "reports": 200, "orca": 1200, "pubmed": 600
    }
    assert exact_quotas(10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 4, "b": 3, "c": 3}
    assert exact_quotas(7, {"small": 0.25, "large": 0.5, "rest": 0.25}) == {"small": 2, "large": 3, "rest": 2}
    # Six equal shares of 9: rounding each (2) overshoots by 3, and the old remainder rule gave one share -1 rows.
    assert exact_quotas(9, dict.fromkeys("abcdef", 1 / 6)) == {"a": 2, "b": 2, "c": 2, "d": 1, "e": 1, "f": 1}


@pytest.mark.parametrize("total", [1, 2, 5, 7, 9, 11, 100, 239, 240000])
@pytest.mark.parametrize("ratios", [dict.fromkeys("abcdef", 1 / 6), {"a": 0.05, "b": 0.45, "c": 0.2, "d": 0.15, "e": 0.15},
                                    {"a": 0.999999, "b": 0.000001}, {"a": 0.0, "b": 1.0}])
def test_quotas_are_exact_and_never_negative(total, ratios):
    quotas = exact_quotas(total, ratios)
    assert sum(quotas.values()) == total and min(quotas.values()) >= 0
    assert all(abs(quotas[key] - total * ratio) < 1 for key, ratio in ratios.items())


def test_exact_and_near_exact_duplicates_are_removed(tmp_path, monkeypatch):
    # One more than it holds, so that every row is read.
    rows, manifest = option_a(tmp_path, monkeypatch, "--total_samples", ORCA_UNIQUE_ROWS + 1,
                              "--ratios", "reports=0,orca=1,pubmed=0")
    assert manifest["sources"]["orca"]["rows_read"] == 12
    assert manifest["sources"]["orca"]["duplicates"] == 2
    keys = [folded(row["instruction"] + "\x00" + row["output"]) for row in rows]
    assert len(rows) == ORCA_UNIQUE_ROWS == len(set(keys))
    assert sum("translate to german" in key for key in keys) == 1


def test_same_seed_gives_byte_identical_output_and_another_seed_another_order(tmp_path, monkeypatch):
    flags = ("--total_samples", 20, "--ratios", "reports=0.25,orca=0.45,pubmed=0.3")
    option_a(tmp_path, monkeypatch, *flags, output="first.jsonl")
    option_a(tmp_path, monkeypatch, *flags, output="second.jsonl")
    option_a(tmp_path, monkeypatch, *flags, "--seed", 7, output="third.jsonl")
    first, second, third = ((tmp_path / f"{name}.jsonl").read_bytes() for name in ("first", "second", "third"))
    assert first == second
    assert first != third


def test_local_json_array_and_parquet_sources_match_jsonl(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in ORCA.read_text(encoding="utf-8").splitlines()]
    array_file, parquet_file = tmp_path / "orca.json", tmp_path / "orca.parquet"
    array_file.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), parquet_file)
    flags = ("--total_samples", 8, "--ratios", "reports=0,orca=1,pubmed=0")
    option_a(tmp_path, monkeypatch, *flags, output="from_jsonl.jsonl")
    for source, name in ((array_file, "from_array"), (parquet_file, "from_parquet")):
        mix_in_process(
            "data_integration.py", "--sources", f"orca={source},pubmed={PUBMED}", "--output_file",
            tmp_path / f"{name}.jsonl", *flags, monkeypatch=monkeypatch,
        )
    reference = (tmp_path / "from_jsonl.jsonl").read_bytes()
    assert (tmp_path / "from_array.jsonl").read_bytes() == reference
    assert (tmp_path / "from_parquet.jsonl").read_bytes() == reference


def test_jsonl_lines_with_blank_lines_crlf_and_no_final_newline(tmp_path, monkeypatch):
    lines = ORCA.read_text(encoding="utf-8").splitlines()
    messy = tmp_path / "messy.jsonl"
    messy.write_bytes(("\r\n".join(lines[:6]) + "\r\n\r\n   \n" + "\n".join(lines[6:])).encode())
    rows, manifest = option_a(tmp_path, monkeypatch, "--sources", f"orca={messy},pubmed={PUBMED}",
                              "--total_samples", ORCA_UNIQUE_ROWS + 1, "--ratios", "reports=0,orca=1,pubmed=0")
    assert manifest["sources"]["orca"]["rows_read"] == 12 and len(rows) == ORCA_UNIQUE_ROWS
    assert not any("\r" in row["output"] for row in rows)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_parallel_preparation_gives_the_same_bytes(tmp_path, monkeypatch, start_method):
    from qwen_sft.mix import stage, workers

    flags = ("--total_samples", 20, "--ratios", "reports=0.25,orca=0.45,pubmed=0.3")
    option_a(tmp_path, monkeypatch, *flags, output="serial.jsonl")
    monkeypatch.setattr(workers, "PARALLEL_MIN_ROWS", 1)
    monkeypatch.setattr(stage, "worker_start_method", lambda: start_method)
    monkeypatch.setattr(workers, "CHUNK_ROWS", 3)
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1})
    option_a(tmp_path, monkeypatch, *flags, output="parallel.jsonl")
    assert (tmp_path / "parallel.jsonl").read_bytes() == (tmp_path / "serial.jsonl").read_bytes()


@pytest.mark.parametrize("rows, buffer_size", [(5, 10), (2500, 1), (2500, 999), (2500, 1000), (4321, 2001)])
def test_local_shuffle_buffer_draws_rows_in_the_order_datasets_does(rows, buffer_size):
    import datasets

    def numbered():
        yield from ({"number": number} for number in range(rows))

    for seed in (0, 42):
        stream = datasets.IterableDataset.from_generator(numbered).shuffle(seed=seed, buffer_size=buffer_size)
        assert list(shuffle_buffered(range(rows), seed, buffer_size)) == [item["number"] for item in stream]


@pytest.mark.parametrize(
    "line",
    [
        b'{"a": [1, -0.0, 2.5e-308, 18446744073709551615, true, null], "b": {"c": "\\u00e9\\n\\"x"}}',
        '{"é": "中文", "a": 1, "a": 2}'.encode(),
        b'{"x": NaN, "y": -Infinity}',  # json extensions that orjson refuses
        b'\xef\xbb\xbf{"a": 1}',
        b'{"a": "\\ud800"}',
        b'{"a": 1,}',  # malformed: the same message as json's
        b'{"a": "\xff"}',
    ],
)
def test_source_lines_parse_as_json_loads_parses_them(line):
    """orjson's fast path reads what records.parse_json (json.loads, less lone surrogates) reads, and refuses a line
    with parse_json's message (json's own, for malformed JSON)."""
    from qwen_sft.records import BadJSON, parse_json

    try:
        expected = repr(parse_json(line))
    except BadJSON as error:
        with pytest.raises(BadJSON) as raised:
            parse_json_line(line)
        assert str(raised.value) == str(error)
        assert b"ud800" in line or _json_refuses(line)  # only a lone surrogate is refused beyond json
    else:
        assert repr(parse_json_line(line)) == expected == repr(json.loads(line))


def _json_refuses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return True
    return False


def test_rows_are_written_as_compact_json_dumps_writes_them():
    """Every code point is escaped as json.dumps(ensure_ascii=False) escapes it (U+2028 left raw), with no spaces."""
    every_character = "".join(chr(code) for code in range(0x110000) if not 0xD800 <= code < 0xE000)
    fields = {"instruction": every_character, "input": '"\\\n\t', "output": "\x00\x1f\x7f\u2028"}
    expected = json.dumps({**fields, "source": "ai"}, ensure_ascii=False, separators=(",", ":")) + "\n"
    assert mix_line(fields, "ai") == expected.encode()


def test_duplicate_keys_ignore_case_and_whitespace_in_any_script():
    assert duplicate_key("Hello  World", "", "OK\n") == duplicate_key("hello world", "", "ok")
    assert duplicate_key("ÉCOLE Straße", "Ünïcode\t", "x") == duplicate_key("école straße", "ünïcode", "X")
    assert duplicate_key("a", "", "b") != duplicate_key("a", "b", "")


# ---------------------------------------------------------------------------------------------------- shortfall


def test_shortfall_is_reported_on_screen_and_in_the_manifest(tmp_path, monkeypatch, capsys):
    rows, manifest = option_a(tmp_path, monkeypatch, "--total_samples", 20, "--ratios", "reports=0.5,orca=0.5,pubmed=0")
    assert Counter(row["source"] for row in rows) == {"reports": 6, "orca": ORCA_UNIQUE_ROWS}
    assert manifest["shortfall"]["reports"] == {"requested": 10, "delivered": 6, "sources_read": {"reports": 6}}
    assert "orca" not in manifest["shortfall"]
    assert "shortfall: reports requested 10, delivered 6" in capsys.readouterr().out


def test_shortfall_can_be_an_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"shortfall .*reports 6/10"):
        option_a(tmp_path, monkeypatch, "--total_samples", 20, "--ratios", "reports=0.5,orca=0.5,pubmed=0",
                 "--shortfall_is_error")
    assert not (tmp_path / "mix.jsonl").exists()


# ---------------------------------------------------------------------------------------------------- Option B


def test_option_b_splits_stackexchange_by_whole_word_keywords(tmp_path, monkeypatch, capsys):
    rows, manifest = option_b(tmp_path, monkeypatch, "--total_samples", 100,
                              "--ratios", "my_reports=0.05,orca=0.05,bio=0.3,ai=0.3,ic=0.3")
    tags = {source: sorted(row["instruction"][1:].split("]")[0] for row in rows if row["source"] == source
                           and row["instruction"].startswith("[")) for source in ("ai", "ic", "bio")}
    assert tags == {"ai": ["AI-1", "AI-2", "AI-3"], "ic": ["IC-1", "IC-2", "IC-3", "MIX-1"], "bio": ["BIO-1", "BIO-2"]}
    counts = Counter(row["source"] for row in rows)
    assert counts == {"my_reports": 5, "orca": 5, "bio": 8 + 2, "ai": 3, "ic": 4}  # bio: all of PubMedQA, then SE
    stackexchange = manifest["sources"]["stackexchange"]
    assert stackexchange["rows_read"] == 12
    assert stackexchange["rejected"] == {"no_answer": 1}
    assert stackexchange["no_keyword_match"] == 2  # the "said"/"basic" and "aid"/"mosaic"/"picnic" traps
    assert stackexchange["keyword_hits"] == {"ai": 4, "ic": 4, "bio": 2}  # MIX-1 hits both, counts for IC
    assert set(manifest["shortfall"]) == {"bio", "ai", "ic"}
    assert manifest["buckets"]["bio"]["sources"] == ["pubmed", "stackexchange"]
    assert "shortfall: ai requested 30, delivered 3" in capsys.readouterr().out


def test_option_b_takes_keywords_as_json_and_best_answers_as_plain_text(tmp_path, monkeypatch):
    keywords = json.dumps({"ai": ["salt"], "ic": ["mosaic"], "bio": ["CRISPR"]})
    rows, manifest = option_b(tmp_path, monkeypatch, "--total_samples", 10, "--keywords", keywords,
                              "--ratios", "my_reports=0,orca=0,bio=0.2,ai=0.4,ic=0.4")
    assert manifest["config"]["KEYWORDS"] == json.loads(keywords)
    by_source = {row["source"]: row for row in rows if row["source"] in ("ai", "ic")}
    assert by_source["ai"]["instruction"].startswith("[TRAP-1] My grandmother said")
    assert by_source["ai"]["output"] == (
        "Salt tightens the gluten and slows the yeast, so the dough rises more slowly but holds its shape."
    )
    assert by_source["ic"]["instruction"].startswith("[TRAP-2]")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("He said the basic recipe was fine", {"ai": 0, "ic": 0}),
        ("Train an AI model on an IC tester", {"ai": 1, "ic": 1}),
        ("用AI做IC测试", {"ai": 1, "ic": 1}),
        ("ai, AI; Ai! ICs and IC's", {"ai": 3, "ic": 1}),
        ("A MACHINE\n   learning pipeline for ASICs", {"ai": 1, "ic": 0}),
        ("machinelearning and aid for mosaic picnics", {"ai": 0, "ic": 0}),
    ],
)
def test_keywords_match_whole_words_and_phrases_in_any_case(text, expected):
    patterns = keyword_patterns({"ai": ["AI", "machine learning"], "ic": ["IC", "integrated circuit"]})
    assert {domain: hits[0] for domain, hits in count_keyword_hits(patterns, [text]).items()} == expected


def test_keywords_with_punctuation_and_cjk_edges():
    patterns = keyword_patterns({"lang": ["C++", "C#", "集成电路"]})
    hits = count_keyword_hits(patterns, ["I write C++ daily", "C#", "ABC++", "国产集成电路设计", "Objective-C"])
    assert hits["lang"] == [1, 1, 0, 1, 0]


# ---------------------------------------------------------------------------------------------------- adapters


def test_html_to_text_leaves_no_tags_or_entities():
    markup = (
        '<p>Use <code>x &lt; y</code> &amp; <strong>bold</strong>&nbsp;text &#8212; caf&eacute; &#x2019;s</p>\n\n\n'
        '<ul><li>one</li><li class="x">two</li></ul><!-- a comment --><script>var a = "<p>";</script>'
        "<pre><code>if a:\n    b()\n</code></pre><p>end<br/>line</p>"
    )
    expected = "Use x < y & bold text \u2014 caf\u00e9 \u2019s\n\n- one\n- two\nif a:\n    b()\n\nend\nline"
    assert html_to_text(markup) == expected


def test_best_answer_is_highest_pm_score_then_selected():
    schema = StackExchangeSchema()

    def answer(score, selected, text):
        return {"answer_id": 1, "author": "a", "pm_score": score, "selected": selected, "text": text}

    row = {"qid": 1, "question": "<p>Q?</p>", "answers": [answer(3, False, "<p>three</p>"), answer(5, False, "five"),
                                                         answer(5, True, "five, selected"), answer(4, True, "four")]}
    assert schema.convert(row) == ("Q?", "", "five, selected")
    row["answers"] = [answer(9, False, "   "), answer(2, False, "<p>only text</p>")]
    assert schema.finish_output(schema.convert(row)[2]) == "only text"
    row["answers"] = [answer("9", False, "text")]
    with pytest.raises(WrongSchema, match="pm_score"):
        schema.convert(row)


def convert_or_why(schema, row):
    from qwen_sft.mix.schemas import Rejected

    try:
        return schema.convert(row)
    except (Rejected, WrongSchema) as error:
        return type(error).__name__, str(error)


@pytest.mark.parametrize("score_type, selected_type", [("int64", "bool"), ("float64", "string"), ("int32", None)])
def test_narrowed_answers_convert_as_the_whole_rows_do(score_type, selected_type):
    """A Parquet batch's answers are cut to the one convert() picks; convert() gives every row the same result
    (ties, blank and whitespace-only texts, no answers, a sliced batch)."""
    import random

    import pyarrow as pa

    blanks = ["", " ", "\t\n", "\u3000", "\x1c", "\u200b", "\xa0x"]  # U+200B and "\xa0x" are not blank
    generator = random.Random(5)
    fields = [("pm_score", pa.type_for_alias(score_type)), ("text", pa.string())]
    if selected_type:
        fields.append(("selected", pa.type_for_alias(selected_type)))

    def random_answer():
        answer = {"pm_score": generator.choice([-1, 0, 2, 2, 7]), "text": generator.choice(blanks + ["a", "b", "c"])}
        if selected_type:
            flag = generator.choice([True, False, None])
            answer["selected"] = flag if selected_type == "bool" else generator.choice(["true", "True", "no", None])
        return answer

    rows = [{"question": f"q{n}", "answers": [random_answer() for _ in range(generator.randrange(5))]}
            for n in range(400)]
    schema = pa.schema([("question", pa.string()), ("answers", pa.list_(pa.struct(fields)))])
    batch = pa.RecordBatch.from_pylist(rows, schema=schema).slice(3)
    narrowed = StackExchangeSchema().narrow_batch(batch)
    assert narrowed is not batch and narrowed.num_rows == batch.num_rows
    assert all(len(row["answers"]) <= 1 for row in narrowed.to_pylist())
    for whole, narrow in zip(batch.to_pylist(), narrowed.to_pylist()):
        assert convert_or_why(StackExchangeSchema(), narrow) == convert_or_why(StackExchangeSchema(), whole)


@pytest.mark.parametrize("answers, kind", [
    ([{"pm_score": 1, "text": None}], "struct<pm_score: int64, text: string>"),
    ([{"pm_score": float("nan"), "text": "a"}], "struct<pm_score: double, text: string>"),
    ([{"pm_score": True, "text": "a"}], "struct<pm_score: bool, text: string>"),
    ([{"pm_score": 1, "text": "a", "selected": 1}], "struct<pm_score: int64, text: string, selected: int64>"),
    ([{"text": "a"}], "struct<text: string>"),
    (None, "struct<pm_score: int64, text: string>"),
])
def test_a_batch_convert_could_refuse_or_rank_otherwise_is_left_whole(answers, kind):
    import pyarrow as pa

    fields = [tuple(field.split(": ")) for field in kind[len("struct<"):-1].split(", ")]
    struct = pa.struct([(name, pa.type_for_alias(kind)) for name, kind in fields])
    schema = pa.schema([("question", pa.string()), ("answers", pa.list_(struct))])
    batch = pa.RecordBatch.from_pylist([{"question": "q", "answers": answers}], schema=schema)
    assert StackExchangeSchema().narrow_batch(batch) is batch


def test_the_blank_text_pattern_is_what_isspace_calls_blank():
    import pyarrow as pa
    import pyarrow.compute as pc

    from qwen_sft.mix.schemas import _BLANK_TEXT

    characters = [chr(code) for code in range(0x110000) if not 0xD800 <= code < 0xE000]
    blank = pc.match_substring_regex(pa.array(characters), _BLANK_TEXT).to_pylist()
    assert [character for character, is_blank in zip(characters, blank) if is_blank] == [
        character for character in characters if character.isspace()]


@pytest.mark.parametrize(
    "schema, row, problem",
    [
        ("orca", {"conversation": []}, '"conversations" must be a list'),
        ("orca", {"conversations": [{"from": "gpt", "value": "answer"}]}, 'a "human" turn followed by a "gpt" turn'),
        ("orca", {"conversations": [{"from": "user", "value": "hi"}]}, "system, human or gpt"),
        ("pubmed", {"question": "q", "long_answer": "a", "final_decision": "yes"}, '"context" must hold'),
        ("pubmed", {"question": "q", "context": {"contexts": ["c"]}, "long_answer": "a", "final_decision": "perhaps"},
         "yes, no or maybe"),
        ("stackexchange", {"question": "q", "answers": "a"}, '"answers" must be a list'),
        ("stackexchange", ["not", "an", "object"], "expected a JSON object"),
    ],
)
def test_adapters_name_what_is_wrong_with_a_row(schema, row, problem):
    with pytest.raises(WrongSchema, match=re.escape(problem)):
        SCHEMAS[schema].convert(row)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--ratios", "reports=0.5,orca=0.4,pubmed=0.3"], ["RATIOS must sum to 1, got 1.2"]),
        (["--ratios", "reports=0.2,orca=0.5,wiki=0.3"], ["RATIOS key 'wiki' is unknown", "reports, orca, pubmed"]),
        (["--sources", f"orca=/nowhere/slimorca.jsonl,pubmed={PUBMED}"], ["/nowhere/slimorca.jsonl: file not found"]),
        (["--my_report_data_path", HUB / "missing.json"], ["missing.json", "not found"]),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, flags, fragments):
    output = tmp_path / "mix.jsonl"
    defaults = {"--my_report_data_path": REPORTS, "--sources": f"orca={ORCA},pubmed={PUBMED}", "--output_file": output}
    result = run_script("data_integration.py", *with_defaults(defaults, flags))
    one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_option_b_bad_keyword_json_exits_2(tmp_path):
    result = run_script("data_set_generation.py", "--keywords", '{"ai": ["LLM"', "--output_file", tmp_path / "m.jsonl")
    one_line_error(result, "--keywords", "invalid JSON")
    assert list(tmp_path.iterdir()) == []


def bad_file(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ratios", "reports=-0.1,orca=0.8,pubmed=0.3"], r"RATIOS\['reports'\] = -0.1 must be a number >= 0"),
        (["--sources", f"orca={ORCA},pubmed={PUBMED},wiki=x.jsonl"], "SOURCES key 'wiki' is unknown"),
        (["--sources", f"orca={ROOT / 'scripts'},pubmed={PUBMED}"],
         r"scripts: not a readable dataset folder \(No \(supported\) data files found"),
        (["--sources", f"orca={REPORTS.with_suffix('.csv')},pubmed={PUBMED}"], "file not found"),
        (["--sources", f"orca={PUBMED},pubmed={PUBMED}", "--fatal_bad_rows"],
         r"orca: .*pubmedqa_pqa_labeled.jsonl:\d+: not in the SlimOrca schema"),
        (["--max_seq_length", 110, "--ratios", "reports=0,orca=1,pubmed=0"],
         r"orca: no usable rows left in .*slimorca.jsonl after 12 read \(too_long 12\)"),
        (["--total_samples", 0], "--total_samples must be at least 1"),
    ],
)
def test_bad_configuration_and_sources_raise_a_user_error(tmp_path, monkeypatch, flags, message):
    with pytest.raises(UserError, match=message):
        option_a(tmp_path, monkeypatch, *flags)
    assert list(tmp_path.iterdir()) == []


def test_malformed_source_line_is_named_with_fatal_bad_rows_and_skipped_without(tmp_path, monkeypatch):
    lines = ORCA.read_text(encoding="utf-8").splitlines()
    text = "\n".join(lines[:2] + ["  ", '{"conversations": [}'] + lines[2:]) + "\n"  # the bad row is line 4
    broken = bad_file(tmp_path, "broken.jsonl", text)
    flags = ["--sources", f"orca={broken},pubmed={PUBMED}", "--total_samples", 20,
             "--ratios", "reports=0,orca=1,pubmed=0"]
    with pytest.raises(UserError, match=r"orca: .*broken.jsonl:4: malformed JSON .*--fatal_bad_rows false"):
        option_a(tmp_path, monkeypatch, *flags, "--fatal_bad_rows", "true")
    assert not (tmp_path / "mix.jsonl").exists()
    rows, manifest = option_a(tmp_path, monkeypatch, *flags)
    assert len(rows) == ORCA_UNIQUE_ROWS and manifest["sources"]["orca"]["rejected"] == {"malformed": 1}


@pytest.mark.parametrize("fatal", ["true", "false"])
def test_a_bad_source_row_is_reported_alike_for_every_seed(tmp_path, monkeypatch, fatal):
    """Line 7 is malformed; the mix needs only 3 of the 12 rows, so the seed decides whether it is ever drawn."""
    lines = ORCA.read_text(encoding="utf-8").splitlines()
    broken = bad_file(tmp_path, "broken.jsonl", "\n".join(lines[:6] + ['{"conversations": [}'] + lines[6:]) + "\n")
    outcomes = set()
    for seed in range(8):
        try:
            option_a(tmp_path, monkeypatch, "--sources", f"orca={broken},pubmed={PUBMED}", "--total_samples", 3,
                     "--ratios", "reports=0,orca=1,pubmed=0", "--seed", seed, "--fatal_bad_rows", fatal,
                     "--overwrite_output", "true")
            outcomes.add("written")
        except UserError as error:
            outcomes.add(str(error))
    assert outcomes == ({"written"} if fatal == "false" else {
        f"orca: {broken}:7: malformed JSON (Expecting value at column 20); fix the row, or pass --fatal_bad_rows "
        "false to skip such rows"})


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("corrupt.parquet", b"PAR1 this is not parquet", r"corrupt.parquet: not a readable Parquet file"),
        ("empty.jsonl", b"\n  \n", r"orca: no usable rows left in .*empty.jsonl after 0 read \(the source is empty\)"),
    ],
)
def test_unreadable_or_empty_source_file(tmp_path, monkeypatch, name, content, message):
    source = tmp_path / name
    source.write_bytes(content)
    with pytest.raises(UserError, match=message):
        option_a(tmp_path, monkeypatch, "--sources", f"orca={source},pubmed={PUBMED}", "--ratios",
                 "reports=0,orca=1,pubmed=0", "--total_samples", 5)
    assert not (tmp_path / "mix.jsonl").exists()


def test_wrong_schema_rows_are_skipped_and_reported_up_to_the_limit(tmp_path, monkeypatch, capsys):
    lines = ORCA.read_text(encoding="utf-8").splitlines()
    wrong = ['{"question": "not orca"}', '{"conversations": "text"}', '{"conversations": [{"from": "gpt"}]}']
    mixed = bad_file(tmp_path, "mixed.jsonl", "\n".join(wrong[:1] + lines[:5] + wrong[1:] + lines[5:]) + "\n")
    rows, manifest = option_a(tmp_path, monkeypatch, "--sources", f"orca={mixed},pubmed={PUBMED}",
                              "--total_samples", 20, "--ratios", "reports=0,orca=1,pubmed=0",
                              "--bad_row_report_limit", 2)
    assert len(rows) == ORCA_UNIQUE_ROWS
    assert manifest["sources"]["orca"]["rejected"] == {"wrong_schema": 3}
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3
    assert warnings[-1] == "warning: further malformed or wrong-schema rows of orca are counted, not shown"
    assert all("mixed.jsonl:" in line and "not in the SlimOrca schema" in line for line in warnings[:2])


def test_unreachable_hub_id_says_how_to_use_a_local_file(tmp_path, monkeypatch):
    with pytest.raises(UserError) as error:
        mix_in_process("data_integration.py", "--my_report_data_path", REPORTS, "--sources",
                       f"orca=Open-Orca/SlimOrca,pubmed={PUBMED}", "--output_file", tmp_path / "mix.jsonl",
                       monkeypatch=monkeypatch)
    message = str(error.value)
    assert "orca: cannot stream the hub dataset 'Open-Orca/SlimOrca'" in message
    assert "--sources orca=/path/to/orca.jsonl" in message and "\n" not in message
    assert not (tmp_path / "mix.jsonl").exists()


@pytest.mark.parametrize(
    "text, where",
    [
        ('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }]', "bad.json:2"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', 'bad.json:2: field "output" is missing'),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"\n', "bad.json:2: malformed JSON"),
    ],
)
def test_bad_report_file_is_named_with_its_line(tmp_path, monkeypatch, text, where):
    report = bad_file(tmp_path, "bad.json", text)
    with pytest.raises(UserError, match=where):
        option_a(tmp_path, monkeypatch, "--my_report_data_path", report)
    assert not (tmp_path / "mix.jsonl").exists()


@pytest.mark.parametrize("script", ["data_integration.py", "data_set_generation.py"])
def test_help_lists_every_constant(script):
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--my_report_data_path", "--sources", "--total_samples", "--ratios", "--output_file", "--seed",
                 "--max_seq_length", "--shortfall_is_error", "--fatal_bad_rows"):
        assert f"\n  {flag} " in result.stdout
    assert ("--keywords" in result.stdout) == (script == "data_set_generation.py")


def test_manifest_hash_matches_the_file_written(tmp_path, monkeypatch):
    rows, manifest = option_a(tmp_path, monkeypatch, "--total_samples", 12)
    data = (tmp_path / "mix.jsonl").read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["output"]["sha256"]
    assert data.endswith(b"\n") and data.count(b"\n") == len(rows) == 12
    assert manifest["elapsed_s"] > 0 and manifest["versions"]["datasets"]


def test_a_longer_system_prompt_lowers_the_byte_budget(tmp_path, monkeypatch):
    """Rows are measured against the system prompt training will use (SYSTEM_PROMPT), not always the default."""
    from qwen_sft.families import family
    from qwen_sft.mix.rows import content_byte_budget, utf8_length

    assert content_byte_budget(2048, "x" * 300) == content_byte_budget(2048, "") - 300
    flags = ("--total_samples", ORCA_UNIQUE_ROWS, "--ratios", "reports=0,orca=1,pubmed=0")
    rows, manifest = option_a(tmp_path, monkeypatch, *flags, output="default.jsonl")
    sizes = sorted(utf8_length(row["instruction"]) + utf8_length(row["input"]) + utf8_length(row["output"])
                   for row in rows)
    assert manifest["sources"]["orca"]["filtered"].get("too_long", 0) == 0
    # A prompt that leaves room for all but the longest row, at the default MAX_SEQ_LENGTH.
    room = manifest["length_budget"]["content_bytes"] - sizes[-1] + 1
    long_prompt = "x" * (room + int(family.BYTES_PER_TOKEN) + utf8_length(manifest["config"]["SYSTEM_PROMPT"]))
    rows, manifest = option_a(tmp_path, monkeypatch, *flags, "--system_prompt", long_prompt, output="long.jsonl")
    budget = manifest["length_budget"]["content_bytes"]
    assert sizes[-2] <= budget < sizes[-1]
    assert manifest["sources"]["orca"]["filtered"]["too_long"] >= 1
    assert all(utf8_length(row["instruction"]) + utf8_length(row["input"]) + utf8_length(row["output"]) <= budget
               for row in rows)


@pytest.mark.parametrize("script, key", [("data_integration.py", "OPTION_A_REPORT_KEY"),
                                         ("data_set_generation.py", "OPTION_B_REPORT_KEY")])
def test_each_stage_default_ratios_name_its_report_bucket(script, key):
    from qwen_sft.mix import plan

    assert getattr(plan, key) in runpy.run_path(str(ROOT / script))["RATIOS"]


def write_parquet_files(folder: Path, sizes: list[int]) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths, number = [], 0
    for index, size in enumerate(sizes):
        rows = [{"question": f"q{number + row}", "answers": [{"pm_score": row, "text": f"a{number + row}"}]}
                for row in range(size)]
        table = pa.Table.from_pylist(rows, schema=pa.schema([
            ("question", pa.string()),
            ("answers", pa.list_(pa.struct([("pm_score", pa.int64()), ("text", pa.string())]))),
        ]))
        paths.append(folder / f"train-{index:05d}.parquet")
        pq.write_table(table, paths[-1], row_group_size=5)
        number += size
    return paths


def test_parquet_rows_are_drawn_in_the_shuffle_order_with_their_numbers_reading_only_what_is_drawn(
        tmp_path, monkeypatch):
    """A ParquetRows gives the rows and numbers that shuffling the files' rows one by one gives, in chunks that
    travel as Arrow, and decodes only the batches that the rows drawn so far reach."""
    from qwen_sft.mix import parquet
    from qwen_sft.mix.reading import numbered_files_rows, numbered_local_rows
    from qwen_sft.mix.workers import pack_chunk, unpack_chunk

    monkeypatch.setattr(parquet, "PARQUET_BATCH_ROWS", 4)
    paths = write_parquet_files(tmp_path, [23, 0, 40])
    expected = list(shuffle_buffered(numbered_files_rows(paths), 3, 11))
    rows = parquet.ParquetRows(paths, None, 3, 11, single_file=False)
    drawn = []
    for chunk in rows.chunks(10):
        numbers = [chunk[index][0] for index in range(len(chunk))]
        drawn += [(number, row) for number, (row, _) in zip(numbers, unpack_chunk(pack_chunk(chunk)))]
        if len(drawn) == 10:
            assert rows.decoded_until < 63  # the first ten rows drawn need only the first batches
        assert [number for number, _, _ in (chunk[index] for index in range(len(chunk[:3])))] == numbers[:3]
        assert len(drawn) < 63 or not rows.batches  # every batch is dropped once its rows are packed
    assert drawn == [(number, row) for number, row, _ in expected]
    single = parquet.ParquetRows(paths[:1], None, 3, 11, single_file=True)
    numbers = [chunk[index][0] for chunk in single.chunks(10) for index in range(len(chunk))]
    assert numbers == [number for number, _, _ in shuffle_buffered(numbered_local_rows(paths[0]), 3, 11)]


@pytest.mark.parametrize("footer_counts", [[30], [30, 10], [20, 10], [20, 11]])
def test_a_parquet_file_whose_rows_differ_from_its_footer_is_one_line(tmp_path, monkeypatch, footer_counts):
    """The footers' counts place every row: a file with fewer or more rows (the first of two too) is an error."""
    from qwen_sft.mix.parquet import ParquetRows
    from qwen_sft.mix.workers import pack_chunk

    paths = write_parquet_files(tmp_path, [23, 10][:len(footer_counts)])
    monkeypatch.setattr(ParquetRows, "_row_count", lambda self, path: footer_counts[paths.index(path)])
    with pytest.raises(UserError, match=r"train-00000.parquet: not a readable Parquet file \(more or fewer rows"):
        for chunk in ParquetRows(paths, None, 3, 11, single_file=len(paths) == 1).chunks(10):
            pack_chunk(chunk)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_parquet_stackexchange_source_prepared_by_workers_matches_jsonl(tmp_path, monkeypatch, start_method):
    """Parquet rows read only the answer fields the schema uses, reach the worker processes as Arrow, and give the
    bytes the same rows give from JSONL in this process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qwen_sft.mix import stage, workers
    from qwen_sft.mix.drawing import open_rows
    from qwen_sft.mix.sources import Source
    from qwen_sft.mix.workers import pack_chunk, unpack_chunk

    rows = [json.loads(line) for line in STACKEXCHANGE.read_text(encoding="utf-8").splitlines()]
    parquet_file = tmp_path / "se.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_file, row_group_size=5)
    source_rows = open_rows(Source("stackexchange", str(parquet_file), SCHEMAS["stackexchange"]), 1, 4, None)
    drawn = [row for chunk in source_rows.chunks(10) for row, _ in unpack_chunk(pack_chunk(chunk))]
    assert {key for row in drawn for answer in row["answers"] for key in answer} == {"pm_score", "selected", "text"}
    flags = ("--total_samples", 9, "--ratios", "my_reports=0,orca=0.3,bio=0.3,ai=0.2,ic=0.2")
    option_b(tmp_path, monkeypatch, *flags)
    reference = (tmp_path / "mix.jsonl").read_bytes()
    monkeypatch.setattr(workers, "PARALLEL_MIN_ROWS", 1)
    monkeypatch.setattr(stage, "worker_start_method", lambda: start_method)
    monkeypatch.setattr(workers, "CHUNK_ROWS", 3)
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1})
    option_b(tmp_path, monkeypatch, *flags, "--sources", f"orca={ORCA},pubmed={PUBMED},stackexchange={parquet_file}")
    assert (tmp_path / "mix.jsonl").read_bytes() == reference
