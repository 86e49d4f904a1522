"""The Click group behind ``slaconv``: one ``error: ...`` line and a documented exit code for every mistake.

Click's own reporting prints a usage block over three lines for a bad option; here a user mistake of any kind
(an unknown option, a bad choice, a :class:`~slaconv.errors.SlaconvError` from the pipeline) is one line on
stderr.  The global flags may also follow the verb (``slaconv convert ... -q``): they are moved before it.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence

import click

from .errors import EXIT_DISK_FULL, SlaconvError

GLOBAL_FLAGS = ("--offline", "-q", "--quiet", "-v", "--verbose")
"""The group's options that take no value, accepted anywhere on the command line."""

INTERRUPTED_EXIT_CODE = 130


def global_flags_first(args: Sequence[str], commands: Sequence[str]) -> list[str]:
    """``args`` with every global flag that follows the verb moved in front of it (nothing after ``--``)."""
    args = list(args)
    verb = next((i for i, a in enumerate(args) if a in commands), None)
    if verb is None:
        return args
    end = args.index("--") if "--" in args[verb:] else len(args)
    moved = [a for a in args[verb + 1:end] if a in GLOBAL_FLAGS]
    rest = [a for a in args[verb + 1:end] if a not in GLOBAL_FLAGS]
    return args[:verb] + moved + [args[verb]] + rest + args[end:]


def _one_line(message: str) -> str:
    return " ".join(message.split())


class SlaconvGroup(click.Group):
    """Turns usage errors and :class:`SlaconvError` into ``error: <message>`` and an exit code, no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = global_flags_first(sys.argv[1:] if args is None else args, list(self.commands))
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(INTERRUPTED_EXIT_CODE)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SlaconvError as exc:
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            click.echo(f"error: the disk is full (writing {exc.filename or 'a file'}); the command stopped there and "
                       "wrote nothing after it (a new work dir or checkpoint appears only once whole): free space and "
                       "run it again", err=True)
            ctx.exit(EXIT_DISK_FULL)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(INTERRUPTED_EXIT_CODE)
