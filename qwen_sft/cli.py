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
import os
import signal
import sys
import threading
import tokenize
from pathlib import Path

from .errors import UserError
from .settings import check_settings
from .values import FALSE_WORDS, FROM_COMMAND_LINE, TRUE_WORDS, format_value, parse_value

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
    """The resolved constants, keyed by their UPPER_CASE names and readable as lower-case attributes.

    `adapter_manifest` is the adapter manifest a later stage settled its `auto` settings from (inherit.py sets it at
    parse time), so that the stage reads it once."""

    adapter_manifest: dict | None = None

    def __getattr__(self, name: str):
        try:
            return self[name.upper()]
        except KeyError:
            raise AttributeError(name) from None


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


def _help_text(doc: str, defaults: dict, comments: dict[str, str]) -> str:
    lines = [doc.strip(), "", "Options (each overrides the constant of the same name at the top of the script):"]
    for name, default in defaults.items():
        lines.append(f"  --{name.lower()} {format_value(default)!s}")
        if comments.get(name):
            lines.append(f"      {comments[name]}")
    return "\n".join(lines)


def parse_config(script_globals: dict, argv: list[str] | None = None, quiet: bool = False, resolve=None) -> Config:
    """Resolve the script's UPPER_CASE constants against `--lower_name value` flags and print the result.

    `resolve(values, notes)`, when given, settles the Config `values` further (e.g. `auto` from the adapter's
    manifest), notes where they came from, and returns lines to print under the config.
    """
    argv = sys.argv[1:] if argv is None else argv
    source = Path(script_globals["__file__"]).read_text(encoding="utf-8")
    comments = _constant_comments(source)
    defaults = {name: script_globals[name] for name in comments}
    if "-h" in argv or "--help" in argv:
        print(_help_text(script_globals.get("__doc__") or "", defaults, comments))
        sys.exit(0)

    values, overridden = _flag_values(argv, defaults)
    values = Config(values)
    notes = dict.fromkeys(overridden, FROM_COMMAND_LINE)
    lines = resolve(values, notes) if resolve is not None else []
    check_settings(values, notes)
    if not quiet:
        say("config:\n" + "\n".join(
            f"  {name} = {format_value(value)}" + (f"   ({notes[name]})" if name in notes else "")
            for name, value in values.items()
        ))
        for line in lines:
            say(line)
    return values


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
            values[name] = parse_value(text, defaults[name], flag)
            overridden.add(name)
        except UserError as error:
            errors.append(str(error))
    if errors:
        raise UserError("; ".join(errors))
    return values, overridden
