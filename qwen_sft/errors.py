"""The error every module raises for bad input; cli.run_stage reports it as one line with exit code 2.

It lives below every other module (cli included), so that the modules cli.parse_config calls can raise it.
"""


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2, never a traceback."""
