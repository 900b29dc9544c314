"""A setting's value as typed on the command line: parsed with the type of its default, and shown back.

Below cli.py, so that settings.py, inherit.py and batching.py, which cli.parse_config calls, parse and show values
the same way without importing cli.
"""

from __future__ import annotations

import json

from .errors import UserError

FROM_COMMAND_LINE = "from the command line"  # how the printed config marks a flag's value
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}


def parse_scalar(text: str, like, flag: str):
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


def parse_value(text: str, default, flag: str):
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
    return parse_scalar(text, default, flag)


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
        return parse_scalar(value, like, flag)
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
