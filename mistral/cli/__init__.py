"""The ``mistral`` command: one entry point, a subcommand per task."""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import warnings
from typing import NoReturn

import simple_parsing as sp

import mistral
from mistral.cli.chat import Chat
from mistral.cli.checks import Bench, Diff
from mistral.cli.folders import Convert, Info
from mistral.cli.run import Generate
from mistral.errors import MistralError

COMMANDS = {
    "generate": Generate,
    "chat": Chat,
    "info": Info,
    "convert": Convert,
    "diff": Diff,
    "bench": Bench,
}
# Placeholders by option name (the rest by type: N for integers, X for numbers, TEXT).
PATHS = {"model", "b_model", "tokenizer", "path", "src", "dst", "json", "plot", "prompts_file"}
METAVARS = {"config": "NAME|PATH", "device": "DEVICE", "tokens": "IDS", "compare": "REFS"}
GROUPS = {"ModelOptions": "model", "SamplingOptions": "sampling"}
SP_DEFAULT = re.compile(r"\s*\(default: %\(default\)s\)$")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help as written by hand: placeholders such as PATH or N, a default where there is one to
    say (and the option's text does not say it), flags without a value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default in ("", [], argparse.SUPPRESS)
        if unset or "Default" in text or not action.option_strings:
            return text
        return f"{text} (default: {default})"


class Parser(sp.ArgumentParser):
    """simple-parsing's parser with --dash-options, hand-written-looking help and usage errors
    on one line, named by the command they belong to."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("add_option_string_dash_variants", sp.DashVariant.DASH)
        kwargs.setdefault("add_config_path_arg", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"\boptions\.(\w+\.)*", "", message)  # dests, not option names
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _preprocessing(self, *args, **kwargs) -> None:
        done = self._preprocessing_done
        super()._preprocessing(*args, **kwargs)
        if not done:
            self.tidy()

    def tidy(self) -> None:
        """simple-parsing's arguments, made to read as a hand-written command's."""
        for group in list(self._action_groups):
            owner = (group.title or "").split(" [")[0]
            if owner in GROUPS:
                group.title, group.description = GROUPS[owner], None
            elif owner in {c.__name__ for c in COMMANDS.values()}:  # the command's own options
                for action in group._group_actions:  # beside --help, positionals apart
                    home = self._optionals if action.option_strings else self._positionals
                    home._group_actions.append(action)
                self._action_groups.remove(group)
        for action in list(self._actions):
            name = action.dest.rsplit(".", 1)[-1]
            if action.help:  # simple-parsing's own "(default: ...)": HelpFormatter says it
                action.help = SP_DEFAULT.sub("", action.help)
            if isinstance(action.default, bool) and action.option_strings:
                self.as_flag(action)
                continue
            if not action.option_strings:  # a positional: PATH, SRC, DST
                action.metavar = name.upper()
                continue
            if action.nargs == "?":  # an Optional[...] field: a value, when given, is required
                action.nargs = None
            if action.choices is None:
                kind = {int: "N", float: "X"}.get(action.type, "TEXT")
                action.metavar = "PATH" if name in PATHS else METAVARS.get(name, kind)

    def as_flag(self, action: argparse.Action) -> None:
        """A bool field as a plain flag (--compile), not --compile [bool] / --nocompile [bool]."""
        group = next(g for g in self._action_groups if action in g._group_actions)
        self._remove_action(action)
        group._group_actions.remove(action)
        for option in action.option_strings:
            self._option_string_actions.pop(option, None)
        group.add_argument(
            action.option_strings[0], action="store_true", dest=action.dest, help=action.help
        )


def first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    return flat.split(". ")[0].rstrip(".") + "."


def parser() -> Parser:
    top = Parser(
        prog="mistral",
        description="Reference Mistral inference on PyTorch and MLX, and tools that check and "
        "explain where the two differ.",
    )
    top.add_argument("--version", action="version", version=f"mistral {mistral.__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for name, cls in COMMANDS.items():
        doc = inspect.cleandoc(cls.__doc__ or "")
        p = sub.add_parser(name, help=first_sentence(doc), description=doc)
        p.add_arguments(cls, dest="options")
    return top


def subcommand(top: Parser, name: str) -> Parser:
    return next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def out_of_memory(e: BaseException) -> bool:
    """numpy's MemoryError, or a framework's allocation failure (torch and MLX raise these as
    RuntimeError)."""
    text = str(e).lower()
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def quiet_third_parties() -> None:
    """Other libraries' warnings stay out of the streamed text; ours are one line each."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation")

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"mistral: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # started with standard output closed: nothing could be shown
        print("mistral: error: standard output is closed", file=sys.stderr)
        return 1
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra:  # reported by the command they were given to, not by `mistral`
        subcommand(top, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    quiet_third_parties()
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
