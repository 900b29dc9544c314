"""Model-family facts live in qwen_sft/families/ only, so that adding a family is one module plus its template."""

import ast

from conftest import ROOT
from qwen_sft.families import family


def string_literals(path):
    """The string constants of a Python file, less its docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_outside_families_spells_a_special_token():
    """Neither the package, nor the stage scripts, nor the benchmarks (docstrings may name a token)."""
    package = ROOT / "qwen_sft"
    code = [*package.rglob("*.py"), *ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py")]
    spelled = {
        str(path.relative_to(ROOT)): token
        for path in code if "families" not in path.relative_to(ROOT).parts
        for text in string_literals(path)
        for token in family.SPECIAL_TOKENS + family.ADDED_NOT_SPECIAL if token in text
    }
    assert spelled == {}


def test_the_family_names_its_template_and_stop_tokens():
    assert family.CHAT_TEMPLATE_PATH.is_file() and family.CHAT_TEMPLATE_PATH.parent.name == "families"
    assert {family.END_OF_TURN, family.END_OF_TEXT} <= set(family.SPECIAL_TOKENS)
    assert family.END_OF_TURN in family.CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    assert family.END_OF_TURN in family.OLLAMA_TEMPLATE
