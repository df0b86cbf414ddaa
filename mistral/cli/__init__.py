"""The ``mistral`` command: one entry point, a subcommand per task."""

from __future__ import annotations

import sys
from typing import NoReturn

import simple_parsing as sp

from mistral.cli.checks import Bench, Diff
from mistral.cli.folders import Convert, Info
from mistral.cli.run import Chat, Generate
from mistral.errors import MistralError

COMMANDS = {
    "generate": Generate,
    "chat": Chat,
    "info": Info,
    "convert": Convert,
    "diff": Diff,
    "bench": Bench,
}


class Parser(sp.ArgumentParser):
    """simple-parsing's parser with --dash-options and usage errors on one line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("add_option_string_dash_variants", sp.DashVariant.DASH)
        kwargs.setdefault("add_config_path_arg", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> Parser:
    top = Parser(
        prog="mistral", description="Reference Mistral/Mixtral inference on PyTorch and MLX."
    )
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for name, cls in COMMANDS.items():
        doc = (cls.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc)
        p.add_arguments(cls, dest="options")
    return top


def out_of_memory(e: BaseException) -> bool:
    """numpy's MemoryError, or a framework's allocation failure (torch and MLX raise these as
    RuntimeError)."""
    text = str(e).lower()
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # started with standard output closed: nothing could be shown
        print("mistral: error: standard output is closed", file=sys.stderr)
        return 1
    args = parser().parse_args(argv)
    try:
        args.options.run()
    except MistralError as e:
        print(f"mistral {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        why = str(e).strip().splitlines()[0] if str(e).strip() else "MemoryError"
        print(
            f"mistral {args.command}: error: out of memory ({why}); a long prompt on a model "
            "without a sliding window needs --chunk-size",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a destination that is read-only, missing or full; stdout closed
        where = f" ({e.filename})" if e.filename else ""
        print(f"mistral {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    return 0
