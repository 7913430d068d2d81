"""Allow ``python -m dltemplate ...``."""

from dltemplate.cli import program

program()
