"""The config convention: types from defaults, bare boolean flags, errors naming the flag, --help."""

import textwrap

import pytest

from qwen_sft.cli import UserError, parse_config

SCRIPT = textwrap.dedent(
    '''\
    """A stage for tests."""
    NAME = "base"  # a string
    STEPS = 10  # an integer
    RATE = 2e-4  # a float
    FLAG = False  # a boolean
    MODULES = ["q_proj", "v_proj"]  # a list
    RATIOS = {"a": 0.5, "b": 0.5}  # a dict
    KEYWORDS = {"ai": ["llm"], "ic": ["asic"]}  # a dict of lists
    '''
)


@pytest.fixture
def script_globals(tmp_path):
    path = tmp_path / "stage.py"
    path.write_text(SCRIPT, encoding="utf-8")
    namespace = {"__file__": str(path)}
    exec(compile(SCRIPT, str(path), "exec"), namespace)
    return namespace


def test_defaults_and_overrides(script_globals, capsys):
    cfg = parse_config(
        script_globals,
        ["--steps", "-1", "--rate=1e-3", "--flag", "--modules", "q_proj,k_proj,o_proj", "--ratios", "a=0.25,b=0.75",
         "--name", "x"],
    )
    assert cfg.steps == -1 and cfg.rate == 1e-3 and cfg.flag is True and cfg.name == "x"
    assert cfg.modules == ["q_proj", "k_proj", "o_proj"]
    assert cfg.ratios == {"a": 0.25, "b": 0.75}
    assert cfg["KEYWORDS"] == {"ai": ["llm"], "ic": ["asic"]}
    printed = capsys.readouterr().out
    assert "STEPS = -1   (from the command line)" in printed and "NAME = x" in printed


def test_boolean_forms(script_globals):
    assert parse_config(script_globals, ["--flag", "false"], quiet=True).flag is False
    assert parse_config(script_globals, ["--flag", "true", "--steps", "3"], quiet=True).steps == 3
    assert parse_config(script_globals, ["--flag", "--steps", "4"], quiet=True).flag is True


def test_json_values(script_globals):
    cfg = parse_config(script_globals, ["--keywords", '{"ai": ["LLM", "GPT"], "bio": ["gene"]}'], quiet=True)
    assert cfg.keywords == {"ai": ["LLM", "GPT"], "bio": ["gene"]}
    assert parse_config(script_globals, ["--ratios", '{"a": 1}'], quiet=True).ratios == {"a": 1.0}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stepz", "3"], "unknown flag --stepz (did you mean --steps?)"),
        (["--steps", "many"], "--steps expects an integer, got 'many'"),
        (["--rate", "fast"], "--rate expects a number"),
        (["--flag", "maybe"], "unexpected argument 'maybe'"),
        (["--ratios", "a"], "--ratios expects key=value"),
        (["--ratios", "a=x"], "--ratios expects a number"),
        (["--keywords", "{bad json"], "--keywords: invalid JSON"),
        (["--name"], "--name needs a value"),
        (["positional"], "unexpected argument 'positional'"),
    ],
)
def test_errors_name_the_flag(script_globals, argv, message):
    with pytest.raises(UserError) as caught:
        parse_config(script_globals, argv, quiet=True)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_all_errors_reported_together(script_globals):
    with pytest.raises(UserError) as caught:
        parse_config(script_globals, ["--bogus", "1", "--steps", "x"], quiet=True)
    assert "--bogus" in str(caught.value) and "--steps" in str(caught.value)


def test_help_lists_every_constant_with_its_comment(script_globals, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_config(script_globals, ["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "A stage for tests." in text
    for flag, comment in [("--steps 10", "an integer"), ("--flag false", "a boolean"),
                          ("--modules q_proj,v_proj", "a list"), ("--ratios a=0.5,b=0.5", "a dict")]:
        assert flag in text and comment in text
