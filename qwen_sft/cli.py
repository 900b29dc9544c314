"""The config convention every stage script shares, and the wrapper that turns bad input into exit code 2.

A stage script declares its tunables as UPPER_CASE constants with one inline comment each, then calls
`parse_config(globals())`. `--lower_case_name VALUE` overrides a constant; the type comes from the default:
booleans take true/false (a bare `--flag` means true), lists are comma-separated (or a JSON list), dicts are
`key=value,key=value` (or a JSON object). Unknown flags and badly typed values are errors naming the flag.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import io
import json
import os
import signal
import sys
import threading
import tokenize
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2, never a traceback."""


_interrupts_received: list[int] = []  # the signals note_interrupt saw since run_stage started


def note_interrupt(signum, frame):
    """Ctrl-C's (and, where a stage installs it, SIGTERM's) handler: KeyboardInterrupt, as Python's own, but noted
    first. Python runs a handler between any two bytecodes, also in Python code that C code calls and whose error it
    discards: numpy.random's compiled first import calls abc.register so, and a Ctrl-C landing there vanished (the
    mix then exited 0). raise_if_interrupted() raises such a lost interrupt again before anything is written."""
    _interrupts_received.append(signum)
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if an interrupt was noted (whether or not its own KeyboardInterrupt got through)."""
    if _interrupts_received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_noted():
    """note_interrupt as the SIGINT handler for the block, where Python's own is installed (the main thread)."""
    _interrupts_received.clear()
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    signal.signal(signal.SIGINT, note_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _end_progress_bars() -> None:
    """Close the progress bars an error left open (a training step's), so that the error starts a line of its own."""
    progress = sys.modules.get("tqdm.std")
    if progress is not None:
        for bar in list(progress.tqdm._instances):
            bar.close()


def run_stage(main) -> None:
    """Run a stage's main(); a UserError becomes one line on stderr and exit code 2."""
    with _interrupts_noted():
        _run(main)


def _run(main) -> None:
    try:
        main()
    except UserError as error:
        _end_progress_bars()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM where a stage turns it into one
        print("error: interrupted; outputs are renamed into place only when complete, so earlier ones are unchanged",
              file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # stdout piped into a command that stopped reading, e.g. `--help | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def is_main_process() -> bool:
    """True on rank 0 of a torchrun / accelerate launch, or in a single process; only it prints and writes."""
    return int(os.environ.get("RANK", 0)) == 0


def say(message: str) -> None:
    """print() on the main process only, so that N launched processes do not print everything N times."""
    if is_main_process():
        print(message, flush=True)


class Config(dict):
    """The resolved constants, keyed by their UPPER_CASE names and readable as lower-case attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name.upper()]
        except KeyError:
            raise AttributeError(name) from None


FROM_COMMAND_LINE = "from the command line"  # how the printed config marks a flag's value
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}


def _constant_comments(source: str) -> dict[str, str]:
    """Map each top-level UPPER_CASE assignment in `source` to its inline comment, in source order."""
    comments_by_line = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    constants = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                constants[name] = comments_by_line.get(node.end_lineno, "")
    return constants


def _parse_scalar(text: str, like, flag: str):
    """Parse `text` as the type of the example value `like`."""
    if isinstance(like, bool):
        word = text.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise UserError(f"{flag} expects true or false, got {text!r}")
    if isinstance(like, int):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{flag} expects an integer, got {text!r}") from None
    if isinstance(like, float):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{flag} expects a number, got {text!r}") from None
    return text


def _parse_value(text: str, default, flag: str):
    """Parse a command-line value with the type of `default`."""
    if isinstance(default, list):
        if text.lstrip().startswith("["):
            value = _parse_json(text, list, flag)
        else:
            value = [item.strip() for item in text.split(",") if item.strip()]
        element = default[0] if default else ""
        return [_coerce(item, element, flag) for item in value]
    if isinstance(default, dict):
        if text.lstrip().startswith("{"):
            pairs = _parse_json(text, dict, flag).items()
        else:
            pairs = []
            for item in filter(None, (part.strip() for part in text.split(","))):
                key, sep, value = item.partition("=")
                if not sep or not key.strip():
                    raise UserError(f"{flag} expects key=value,key=value (or a JSON object), got {item!r}")
                pairs.append((key.strip(), value.strip()))
            _refuse_repeated_keys([key for key, _ in pairs], flag)
        example = next(iter(default.values()), "")
        return {key: _coerce(value, default.get(key, example), flag) for key, value in pairs}
    return _parse_scalar(text, default, flag)


def _parse_json(text: str, kind: type, flag: str):
    try:
        value = json.loads(text, object_pairs_hook=lambda pairs: _object_once(pairs, flag))
    except json.JSONDecodeError as error:
        raise UserError(f"{flag}: invalid JSON ({error})") from None
    if not isinstance(value, kind):
        raise UserError(f"{flag} expects a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _object_once(pairs: list[tuple], flag: str) -> dict:
    """A JSON object whose keys are all different (json.loads would keep the last of a repeated key silently)."""
    _refuse_repeated_keys([key for key, _ in pairs], flag)
    return dict(pairs)


def _refuse_repeated_keys(keys: list[str], flag: str) -> None:
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise UserError(f"{flag} names {', '.join(map(repr, repeated))} more than once; give each key once")


def _coerce(value, like, flag: str):
    """Give an element parsed from a list/dict the type of the default's elements."""
    if isinstance(value, str) and not isinstance(like, (str, list, dict)):
        return _parse_scalar(value, like, flag)
    if isinstance(like, bool) != isinstance(value, bool) or (
        isinstance(like, (int, float)) and not isinstance(value, (int, float))
    ):
        raise UserError(f"{flag}: {value!r} is not a {type(like).__name__}")
    if isinstance(like, float) and isinstance(value, int):
        return float(value)
    return value


def format_value(value) -> str:
    """Render a value the way it would be typed on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value):
        return ",".join(format_value(item) for item in value)
    if isinstance(value, dict):
        if all(isinstance(item, (str, int, float)) for item in value.values()):
            return ",".join(f"{key}={format_value(item)}" for key, item in value.items())
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _help_text(doc: str, defaults: dict, comments: dict[str, str]) -> str:
    lines = [doc.strip(), "", "Options (each overrides the constant of the same name at the top of the script):"]
    for name, default in defaults.items():
        lines.append(f"  --{name.lower()} {format_value(default)!s}")
        if comments.get(name):
            lines.append(f"      {comments[name]}")
    return "\n".join(lines)


def parse_config(script_globals: dict, argv: list[str] | None = None, quiet: bool = False, resolve=None) -> Config:
    """Resolve the script's UPPER_CASE constants against `--lower_name value` flags and print the result.

    `resolve(values, notes)`, when given, settles values further (e.g. `auto` from the adapter's manifest), notes
    where they came from, and returns lines to print under the config.
    """
    argv = sys.argv[1:] if argv is None else argv
    source = Path(script_globals["__file__"]).read_text(encoding="utf-8")
    comments = _constant_comments(source)
    defaults = {name: script_globals[name] for name in comments}
    if "-h" in argv or "--help" in argv:
        print(_help_text(script_globals.get("__doc__") or "", defaults, comments))
        sys.exit(0)

    values, overridden = _flag_values(argv, defaults)
    notes = dict.fromkeys(overridden, FROM_COMMAND_LINE)
    lines = resolve(values, notes) if resolve is not None else []
    from .settings import check_settings  # it imports this module

    check_settings(values, notes)
    if not quiet:
        say("config:\n" + "\n".join(
            f"  {name} = {format_value(value)}" + (f"   ({notes[name]})" if name in notes else "")
            for name, value in values.items()
        ))
        for line in lines:
            say(line)
    return Config(values)


def _flag_values(argv: list[str], defaults: dict) -> tuple[dict, set]:
    """`defaults` with the values of the flags in `argv`, and the names given; every bad flag in one UserError."""
    flags = {f"--{name.lower()}": name for name in defaults}
    values = dict(defaults)
    overridden, errors = set(), []
    position = 0
    while position < len(argv):
        word = argv[position]
        position += 1
        flag, has_equals, text = word.partition("=")
        if not flag.startswith("--"):
            errors.append(f"unexpected argument {word!r} (options look like --name value)")
            continue
        name = flags.get(flag.replace("-", "_").replace("__", "--", 1))
        if name is None:
            close = difflib.get_close_matches(flag, list(flags), n=1)
            errors.append(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else "") + "; see --help")
            continue
        if not has_equals:
            next_is_value = position < len(argv) and not argv[position].startswith("--")
            if isinstance(defaults[name], bool) and not (
                next_is_value and argv[position].lower() in TRUE_WORDS | FALSE_WORDS
            ):
                text = "true"  # a bare boolean flag switches it on
            elif next_is_value or (position < len(argv) and argv[position] == "-"):
                text = argv[position]
                position += 1
            else:
                errors.append(f"{flag} needs a value (one that starts with -- is passed as {flag}=VALUE)")
                continue
        if name in overridden:
            errors.append(f"{flag} is given more than once; give it once")
            continue
        try:
            values[name] = _parse_value(text, defaults[name], flag)
            overridden.add(name)
        except UserError as error:
            errors.append(str(error))
    if errors:
        raise UserError("; ".join(errors))
    return values, overridden
