"""`quantlens` command line: parse, call the engine, print. No analysis logic lives here.

Every user error ends as one line on stderr and a non-zero exit, never a traceback (`--debug`
shows it when you do want one). That rule lives here, in `main`, the one place errors are caught.

    parser    the argparse tree (cheap to build: it runs on every start)
    commands  one function per subcommand
    __main__  `python -m analysis.cli`, the same as the `quantlens` console script (`entry`)
"""

from __future__ import annotations

import sys
import warnings
from typing import Sequence

from analysis.cli.commands import CLIError
from analysis.cli.parser import build_parser

__all__ = ["main", "entry", "build_parser", "CLIError", "EXIT_USER_ERROR", "EXIT_INTERRUPTED"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _text_data(args)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            return args.func(args)
    except KeyboardInterrupt:
        print(f"quantlens: {_interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 — the one place every error becomes one line
        if args.debug:
            raise
        print(f"quantlens: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


def _text_data(args) -> None:
    """--data corpus.txt with --tokenizer/--seq-len becomes the data spec a run records
    ("corpus.txt#tokenizer=DIR,seq_len=N"), so that suggest/evaluate/export load the same samples.
    A text file with no --tokenizer uses the model directory's tokenizer when it has one."""
    from pathlib import Path

    from analysis.cli.parser import DEFAULT_SEQ_LEN
    from analysis.loading.hf import TEXT_SUFFIXES, has_tokenizer, split_text_spec, text_spec

    data = getattr(args, "data", None)
    if not data or split_text_spec(data) is not None:
        return
    tokenizer, seq_len = getattr(args, "tokenizer", None), getattr(args, "seq_len", None)
    model = getattr(args, "model", None)
    if tokenizer is None and Path(data).suffix.lower() in TEXT_SUFFIXES and model and has_tokenizer(model):
        tokenizer = model
    if tokenizer is None and seq_len is None:
        return
    if tokenizer is None:
        raise CLIError("--seq-len applies to text data tokenized with --tokenizer DIR; pass the tokenizer directory")
    args.data = text_spec(data, tokenizer, seq_len or DEFAULT_SEQ_LEN)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """quantlens' own warnings as one line; other libraries' as Python shows them."""
    from analysis.quantsim import QuantlensWarning

    if issubclass(category, QuantlensWarning):
        print(f"quantlens: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")


def _interrupted(args) -> str:
    """What an interrupt leaves behind: only `analyze` keeps partial work (and has --resume)."""
    if args.command == "analyze":
        return (f"interrupted; the finished trials are saved in {args.out} — rerun the same command with "
                "--resume to continue")
    return (f"interrupted; `{args.command}` has no --resume: run it again (its outputs are only ever "
            "replaced whole, never left half-written)")


def _one_line(exc: BaseException) -> str:
    """User errors (all quantlens errors are ValueErrors) as they are; anything else names its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, (CLIError, ValueError, FileNotFoundError, KeyError)):
        return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
    return text.strip("'\"") if isinstance(exc, KeyError) else text


def entry() -> int:
    """The console script (`quantlens`); `python -m analysis.cli` runs the same."""
    return main()

