"""The command line.

    retrofit MODEL [--attn NAME | --rules FILE] [options]   retrofit a model, print the diff
    retrofit list                                           attention types and built-in rule sets
    retrofit diff A B                                       compare two saved models' parameters (files,
                                                            folders, checkpoints, hf-hub:ORG/NAME saves)
    retrofit gates ...                                      inspect a fine-tuned model's gates
    retrofit --version                                      this distribution's name and version

Exit codes, decided in one place (:func:`main`): 0 success; 1 the identity check failed;
2 a user error (a bad model, file, rule, argument, checkpoint, or no network), with one
line on stderr that says what and how to fix it; 3 an unexpected internal error, with one
line that says it is a bug (``--debug`` shows the traceback); 141 the reader of stdout went
away (``retrofit ... | head``), as for any program a closed pipe stops; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import DataError, OptionError, RetrofitError, RuleError, SaveError, first_line
from .readfile import Limits, json_depth
from .text import excerpt, printable, printable_lines

__all__ = ["main"]

EXIT_OK, EXIT_IDENTITY_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a program stopped by SIGPIPE
EXIT_INTERRUPTED = 130

# The largest sizes the command line accepts, checked before anything is built: each is
# far above what a CNN is used with, and far below what would exhaust memory at once
# (--input-size 100000 asked for a 240 GB input, --num-classes 10000000000 a 20 TB layer).
MAX_INPUT_SIDE = 8192  # pixels, height and width each
MAX_INPUT_CHANNELS = 4096
MAX_NUM_CLASSES = Limits().classes


class _Progress:
    """One line per slow step on stderr, only for a person watching a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:5.1f}s] {printable(message)}", file=sys.stderr, flush=True)


def _input_size(text: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use 224, 224x224 or 3x224x224") from None
    if len(parts) not in (1, 2, 3) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use 224, 224x224 or 3x224x224")
    if max(parts[-2:]) > MAX_INPUT_SIDE or (len(parts) == 3 and parts[0] > MAX_INPUT_CHANNELS):
        raise argparse.ArgumentTypeError(f"{text!r} is too large: at most {MAX_INPUT_SIDE} pixels a side and "
                                         f"{MAX_INPUT_CHANNELS} channels")
    return parts


def _num_classes(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a class count; use an integer >= 1 (0: no classifier)")
    if n > MAX_NUM_CLASSES:
        raise argparse.ArgumentTypeError(f"{text!r} is too many classes: at most {MAX_NUM_CLASSES:,}")
    return n


def _count(text: str) -> int:
    """A number of images or batches: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count; use an integer >= 1")
    return n


def _check_not_empty(option: str, name: str) -> None:
    """Refuse an empty file name (``--out ''``), which names no file.

    Raises:
        OptionError: ``name`` is empty.
    """
    if not name:
        raise OptionError(f"{option} '': the name is empty; give the name of the file to write")


def _check_out_name(option: str, name: str) -> None:
    """Refuse a name no file can be written and read back under, before anything is built.

    Raises:
        OptionError: ``name`` is empty, or not UTF-8 (``sys.argv`` holds the bytes of such
            a name as lone surrogates; safetensors takes UTF-8 names only, so the save
            could be written by Python but not opened again).
    """
    _check_not_empty(option, name)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        bad = name[e.start]
        byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
        raise OptionError(f"{option} '{shown}': the name is not UTF-8{byte}; a save under it could not be read back "
                          "(safetensors opens UTF-8 names only). Nothing was written; choose a UTF-8 name") from None


def _model_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. encoder_name=resnet34, in_chans=1)")
    try:
        parsed = json.loads(value)
        if json_depth(parsed, 32) > 32:
            raise RecursionError
        return key, parsed
    except RecursionError:
        raise argparse.ArgumentTypeError(f"--model-arg {key}: its JSON value nests too deeply to read (a model "
                                         "argument is a number, a string, or a short list or table)") from None
    except ValueError:  # not JSON: the text itself ("resnet34"); also an integer too long to convert
        if value[:1] in "[{" or value.lstrip("-")[:1].isdigit() and len(value) > 4300:
            raise argparse.ArgumentTypeError(f"--model-arg {key}: {excerpt(value, 40)} is not valid JSON (write a "
                                             "list or table as JSON: in_chans=1, img_size=[224,224])") from None
        return key, value


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (not usage + error) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def version_text() -> tuple[str, list[str]]:
    """What ``retrofit --version`` prints: this distribution's name and version, where the
    package was imported from and the versions it runs with; and a warning for each
    other installed distribution that also provides the import name ``retrofit``.

    The distribution named ``retrofit`` on PyPI is an unrelated project whose wheel installs
    a top-level ``retrofit`` package too; in one environment, the second install overwrites
    files of the first.
    """
    import timm
    import torch
    import torchvision

    from .version import DISTRIBUTION, __version__

    # The modules' own versions (torch's names its build: 2.14.1+cu130); `import retrofit`
    # has imported all three already.
    uses = ", ".join(f"{m.__name__} {m.__version__}" for m in (torch, torchvision, timm))
    line = (f"{DISTRIBUTION} {__version__} from {Path(__file__).resolve().parent} "
            f"({uses}; Python {platform.python_version()})")
    warnings = []
    try:
        other = metadata.distribution("retrofit")
    except metadata.PackageNotFoundError:
        other = None
    if other is not None:
        warnings.append(
            f"warning: the distribution 'retrofit' {other.version} ({other.metadata['Summary'] or 'no summary'}) is "
            f"installed in this environment too; it is not {DISTRIBUTION}, but it installs files under the same "
            f"import name `retrofit`, so each can overwrite the other's. Run `pip uninstall retrofit`, then "
            f"`pip install --force-reinstall {DISTRIBUTION}`"
        )
    return line, warnings


def _budget(text: str) -> tuple[str, float]:
    """``params=2%``, ``flops=0.01`` or ``top=4``."""
    kind, _, value = text.partition("=")
    try:
        number = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
    except ValueError:
        number = -1.0
    if kind == "top" and number >= 1 and number == int(number) and not value.endswith("%"):
        return kind, number
    if kind in ("params", "flops") and 0 < number <= 1:
        return kind, number
    raise argparse.ArgumentTypeError(f"{text!r} is not a budget; use params=2%, flops=1% (a fraction of the "
                                     "model's, at most 100%) or top=4")


_COMMANDS_HELP = """\
Add identity-initialized attention to a CNN and print the before/after diff.

commands:
  retrofit MODEL [options]     retrofit a model, print the diff (the options below)
  retrofit list                attention types and built-in rule sets
  retrofit diff A B            compare the parameter counts of two saved models
  retrofit gates CKPT --data   plot what a fine-tuned model's gates learned
  retrofit COMMAND --help      the options of one command"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="retrofit",
        usage="%(prog)s MODEL [--attn NAME | --rules FILE] [options]\n       %(prog)s {list,diff,gates} ...",
        description=_COMMANDS_HELP,
        epilog="example: retrofit resnet50 --attn cbam",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_arguments(p)
    _rewrite_arguments(p)
    _output_arguments(p)
    return p


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """The model to build and what goes into it before the rewrite."""
    p.add_argument("model", help="timm model name, hf-hub:ORG/NAME (a timm model on the Hugging Face Hub), "
                   "torchvision:NAME, path/to/file.py:factory, ultralytics:yolov8n.yaml (a model yaml Ultralytics "
                   "ships, or a path to one; ultralytics:best.pt reads a checkpoint and needs --trust-code), "
                   "transformers:ResNetForImageClassification (a class, with its default config), "
                   "transformers:path/to/folder (holding a config.json), or smp:Unet "
                   "(segmentation_models_pytorch; --model-arg encoder_name=resnet34)")
    p.add_argument("--model-arg", action="append", default=[], type=_model_arg, metavar="KEY=VALUE",
                   help="an argument for the model's constructor (a config field for transformers); VALUE is "
                        "read as JSON when it parses (3, true, [1, 2]), else as a string (repeatable)")
    p.add_argument("--trust-code", action="store_true",
                   help="allow a model spec that runs code when read (an Ultralytics .pt checkpoint is a pickle)")


def _rewrite_arguments(p: argparse.ArgumentParser) -> None:
    """The rules and options of the rewrite (and the model's size and weights)."""
    p.add_argument("--attn", default="se", help="built-in rule set (default: se; see `retrofit list`)")
    p.add_argument("--rules", metavar="FILE", help="rule file (TOML); overrides --attn")
    p.add_argument("--gate", choices=("identity", "sigmoid"), help="gate form for every rule")
    p.add_argument("--input-size", type=_input_size, metavar="SIZE",
                   help=f"224, 224x224 or 3x224x224 (at most {MAX_INPUT_SIDE} a side, {MAX_INPUT_CHANNELS} channels)")
    p.add_argument("--num-classes", type=_num_classes, metavar="N",
                   help=f"classifier size of the built model (0: no classifier; at most {MAX_NUM_CLASSES:,})")
    p.add_argument("--pretrained", action="store_true", help="download pretrained weights (needs the network)")
    p.add_argument("--checkpoint", metavar="PATH", help="weights for the model before retrofitting "
                   "(.safetensors, or .pt/.pth loaded with weights_only=True)")
    p.add_argument("--leaf-module", action="append", default=[], metavar="NAME",
                   help="class name or module path not to trace into (repeatable)")
    p.add_argument("--strict", action="store_true", help="a rule glob that matches no site is an error")
    p.add_argument("--allow-empty", action="store_true",
                   help="let rules that select no site of the model pass (exit 0, nothing inserted); without it "
                        "that is an error")
    p.add_argument("--keep-class", action="store_true",
                   help="keep the model's class: rewrite traced submodules in place, not its own forward")
    p.add_argument("--no-fuse", action="store_true", help="call gating modules instead of fusing them into adds")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    """Where the result goes and how the command shows it."""
    p.add_argument("--out", metavar="PATH", help="save to PATH.safetensors or a folder (weights + recipe); an "
                   "Ultralytics model also to PATH.pt, a checkpoint YOLO(PATH.pt) loads")
    p.add_argument("--force", action="store_true", help="let --out replace an existing file")
    p.add_argument("--score-data", metavar="DIR",
                   help="score every site on this data before choosing (retrofit.score_sites): an ImageFolder "
                        "(DIR/CLASS/*.jpg) of the model's task")
    p.add_argument("--score-batches", type=_count, default=8, metavar="N", help="batches to score on (default 8)")
    p.add_argument("--score-batch-size", type=_count, default=32, metavar="N", help="images per scoring batch")
    p.add_argument("--budget", type=_budget, metavar="WHAT",
                   help="choose sites by score: params=2%% or flops=1%% (a fraction of the model's), or top=4; "
                        "needs --score-data")
    p.add_argument("--dry-run", action="store_true", help="show the plan (what would change, and why not elsewhere)")
    p.add_argument("--sites", action="store_true", help="add a row per inserted module")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no table (errors and --format json only)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also say what is expected on the way (a YOLO or transformers model rewritten in its blocks)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="store_true", help="print the distribution's name and version, and exit")


def _version() -> int:
    line, notes = version_text()
    print(line)
    for note in notes:
        print(printable(note), file=sys.stderr)
    return EXIT_OK


@contextlib.contextmanager
def _quiet_stderr(quiet: bool) -> Iterator[None]:
    """With -q, what libraries print to stderr while the model is built (download bars and
    lines) goes nowhere; errors are raised, and printed after."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        yield


def _print_warnings(caught: list[warnings.WarningMessage], shown: Sequence[str]) -> None:
    """Each warning once, as one line; those already in the output (``shown``) not again."""
    seen = set(shown)
    for w in caught:
        message = str(w.message)
        if message not in seen:
            seen.add(message)
            print(f"warning: {printable((message.strip().splitlines() or [message])[0])}", file=sys.stderr)


def _run_model(args: argparse.Namespace) -> int:
    # Python's warnings are collected and printed once, as one line each, after the
    # output: the report repeats those of retrofit() itself, which are not printed again.
    with warnings.catch_warnings(record=True) as caught:
        if args.quiet:
            warnings.simplefilter("ignore")
        code, shown = _retrofit_model(args)
    _print_warnings(caught, shown)
    return code


def _retrofit_model(args: argparse.Namespace) -> tuple[int, Sequence[str]]:
    """Run the model command; return the exit code and the warnings the output already shows."""
    if args.quiet:
        # Hugging Face reads these when it is imported (with timm, later): no bars, no warnings.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    from .api import get_report, plan, retrofit
    from .options import RetrofitOptions

    _check_out(args)
    progress = _Progress(not args.quiet and sys.stderr.isatty())
    model = _build(args, progress)
    options = RetrofitOptions(gate=args.gate, input_size=args.input_size, leaf_modules=tuple(args.leaf_module),
                              strict=args.strict, keep_class=args.keep_class, fuse=not args.no_fuse)
    rules, scores = _scored_rules(args, model, progress)
    options = options.replace(scores=scores)
    extra = {"scores": scores.to_dict()} if scores else {}
    if args.dry_run:
        progress("tracing and planning")
        the_plan = plan(model, args.attn, rules=rules, options=options)
        if args.format == "json":
            print(json.dumps({**the_plan.to_dict(), **extra}, indent=2))
        elif not args.quiet:
            print(printable_lines(the_plan.table()))
        return EXIT_OK, the_plan.warnings
    progress("tracing, inserting attention, checking identity")
    with _verbose(args.verbose and not args.quiet):
        gm = retrofit(model, args.attn, rules=rules, options=options)
    report = get_report(gm)
    code = _show_report(report, args, extra)
    if code == EXIT_OK and args.out:
        progress(f"saving {args.out}")
        _save(gm, args)
    return code, report.warnings


def _check_out(args: argparse.Namespace) -> None:
    """``--out``: a name a save can be read back under, not taken (unless ``--force``);
    checked before anything is built."""
    if args.out is not None:
        _check_out_name("--out", args.out)
    if args.out and os.path.lexists(args.out) and not args.force and not args.dry_run:
        what = " (a symbolic link)" if os.path.islink(args.out) else ""
        raise SaveError(f"{args.out!r} exists{what}; not overwriting it (pass --force to replace it)")


def _show_report(report: Any, args: argparse.Namespace, extra: dict[str, Any]) -> int:
    """Print the diff (table or JSON); the exit code: 1 where the identity check failed.

    Raises:
        RuleError: nothing was inserted, and ``--allow-empty`` was not given.
    """
    if not report.rows and not args.allow_empty:
        raise RuleError(_nothing_inserted(report, args.rules or args.attn))
    if args.format == "json":
        print(json.dumps({**report.to_dict(), **extra}, indent=2))
    elif not args.quiet:
        _print_report(report, args.sites)
    if report.identity_ok is False:
        print(f"retrofit: error: the rewritten model's outputs differ from the original's by up to "
              f"{report.max_abs_diff:.3g} at init{'; not saved' if args.out else ''}", file=sys.stderr)
        return EXIT_IDENTITY_FAILED
    return EXIT_OK


@contextlib.contextmanager
def _verbose(enabled: bool) -> Iterator[None]:
    """With -v, retrofit's INFO lines (what is expected on the way) on stderr."""
    import logging

    if not enabled:
        yield
        return
    logger = logging.getLogger("retrofit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("retrofit: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _nothing_inserted(report: Any, rules: str) -> str:
    """Why rules that selected no site of the model are an error, and what to try."""
    why = f" ({report.skipped[0][1]})" if report.skipped else ""
    return (f"rules {rules!r} selected no site of {report.model} ({report.sites_found} sites found, "
            f"{len(report.skipped)} left alone{why}); nothing was inserted. They were written for other models? "
            f"See `retrofit list`, or `--dry-run` for why each site was left; pass --allow-empty to accept it")


def _build(args: argparse.Namespace, progress: _Progress) -> Any:
    """The model the command names (``--checkpoint`` weights loaded into it)."""
    from .models import create_model
    from .weights import load_checkpoint

    progress(f"building {args.model}" + (" (downloading weights)" if args.pretrained else ""))
    with _quiet_stderr(args.quiet):
        model = create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                             trust_code=args.trust_code, **dict(args.model_arg))
    if args.checkpoint:
        progress(f"loading {args.checkpoint}")
        load_checkpoint(model, args.checkpoint)
    return model


def _scored_rules(args: argparse.Namespace, model: Any, progress: _Progress) -> tuple[Any, Any]:
    """The rules (``--rules``, else None: ``--attn`` names them) and, with ``--score-data``,
    the sites' scores (printed with the table) and the rules set to choose by them
    (``--budget``); without it, no scores (None)."""
    from .rulefile import resolve_rules

    if args.budget and not args.score_data:
        raise OptionError(f"--budget {args.budget[0]}=... chooses sites by score; give the data to score them on "
                          "with --score-data DIR (an ImageFolder)")
    if not args.score_data:
        return args.rules, None
    progress(f"scoring sites on {args.score_data}")
    scores = _scores(args, model)
    ruleset = resolve_rules(args.attn, args.rules)
    if args.budget:
        kind, value = args.budget
        ruleset = ruleset.selecting(top=int(value)) if kind == "top" else ruleset.selecting(budget=(kind, value))
    if args.format == "table" and not args.quiet:
        print(printable_lines(str(scores)))
        print()
    return ruleset, scores


def _print_report(report: Any, sites: bool) -> None:
    """The diff as tables, then the report's warnings on stderr (text from files escaped)."""
    print(printable_lines(report.summary()))
    print()
    print(printable_lines(report.stage_table()))
    if sites:
        print()
        print(printable_lines(report.site_table()))
    if report.traced or report.left_alone:
        print()
        print(printable_lines("\n".join(report.reach_lines())))
    sys.stdout.flush()  # the report, then its warnings
    for w in report.warnings:
        print(f"warning: {printable(w)}", file=sys.stderr)


def _save(gm: Any, args: argparse.Namespace) -> None:
    """``--out``: a retrofit save, or (a name in a library's own format: ``NAME.pt``, an
    Ultralytics checkpoint) the library's own file."""
    from .build import save
    from .frameworks import framework_of, registered_frameworks

    native = next((f for f in registered_frameworks() if f.native_suffix and args.out.endswith(f.native_suffix)), None)
    if native is not None:
        if framework_of(gm) is not native:
            raise OptionError(f"--out {args.out!r}: a {native.native_suffix} file is {native.native_format}, for "
                              f"{native.distribution} models; save other models to NAME.safetensors or a folder")
        path = native.save_native(gm, args.out, force=args.force)
        hint = native.native_hint(path)
    else:
        path = save(gm, args.out, force=args.force)  # create_model recorded the model and its arguments
        hint = f"load it with retrofit.load({str(path)!r})"
    if not args.quiet and args.format == "table":
        print(printable_lines(f"\nsaved {path} ({hint})"))


def _scores(args: argparse.Namespace, model: Any) -> Any:
    """Scores of every candidate site on ``--score-data``, in a fixed shuffled order."""
    import torch
    from torch.utils.data import DataLoader

    from .data import imagefolder_dataset
    from .scoring import score_sites

    dataset = imagefolder_dataset(args.score_data, model)
    if args.score_batches < 1 or args.score_batch_size < 1:
        raise OptionError("--score-batches and --score-batch-size must be at least 1")
    loader = DataLoader(dataset, batch_size=args.score_batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    return score_sites(model, args.attn, loader, batches=args.score_batches, rules=args.rules,
                       input_size=args.input_size, leaf_modules=tuple(args.leaf_module))


_WIDTH = 100  # columns the tables of `retrofit list` fit in


def _wrapped_table(rows: dict[str, str], headers: list[str]) -> str:
    """Two columns, the second wrapped so that every line fits :data:`_WIDTH` columns."""
    import textwrap

    from tabulate import tabulate

    first = max([len(headers[0]) + 2, *map(len, rows)])  # tabulate pads a header by two
    width = _WIDTH - first - 2  # and puts two spaces between columns
    cells = [[k, "\n".join(textwrap.wrap(v, width, max_lines=3, placeholder=" ..."))] for k, v in rows.items()]
    return tabulate(cells, headers=headers)


def _list(argv: Sequence[str]) -> int:
    import re

    from .attention import get_attention, list_attention
    from .rulefile import list_builtin_rules

    p = OneLineParser(prog="retrofit list", description="List attention types and built-in rule sets.")
    p.add_argument("--format", choices=("table", "json"), default="table")
    args = p.parse_args(argv)

    def description(obj: object) -> str:
        """The docstring's first paragraph, on one line."""
        paragraph = (obj.__doc__ or "").strip().split("\n\n", 1)[0]
        return " ".join(paragraph.split())

    def first_sentence(text: str) -> str:
        return re.split(r"(?<=\.)\s", text.replace("``", ""), maxsplit=1)[0]

    attns = {name: description(get_attention(name)) for name in list_attention()}
    # A type's constraints (groups that must divide the channels, ...): the class says them in
    # one sentence; a site that breaks one is skipped, with the reason in the plan.
    constraints = {name: getattr(get_attention(name), "constraints", None) or None for name in list_attention()}
    rules = list_builtin_rules()
    if args.format == "json":
        print(json.dumps({"attention": attns, "constraints": constraints, "rules": rules}, indent=2))
    else:
        short = {name: first_sentence(text) for name, text in attns.items()}
        print(printable_lines(_wrapped_table(short, ["attention (--rules attn=)",
                                                     "description (retrofit.get_attention(NAME))"])))
        print()
        limited = {name: str(text) for name, text in constraints.items() if text}
        if limited:
            print(printable_lines(_wrapped_table(limited, ["attention", "constraints (a site that breaks one is "
                                                           "skipped; --dry-run says which and why)"])))
            print()
        print(printable_lines(_wrapped_table(rules, ["rule set (--attn)", "description (rules/NAME.toml)"])))
    return EXIT_OK


def _diff(argv: Sequence[str]) -> int:
    from tabulate import tabulate

    from .build import local_save
    from .saving import read_save, tensor_sizes

    p = OneLineParser(prog="retrofit diff", description="Compare the parameter counts of two saved models "
                "(read from the files; nothing is built or imported).")
    what = "saved model (.safetensors, folder, fine-tuning .pt checkpoint, or hf-hub:ORG/NAME on the Hugging Face Hub)"
    p.add_argument("a", help=what)
    p.add_argument("b", help=what)
    p.add_argument("--format", choices=("table", "json"), default="table")
    args = p.parse_args(argv)
    counts = []
    for path in (args.a, args.b):
        saved = read_save(local_save(path), path)  # each file read once
        buffers = set(saved.buffers)
        groups: dict[str, int] = {}
        for name, numel in tensor_sizes(saved).items():
            if name not in buffers:
                key = name.split(".", 1)[0]
                groups[key] = groups.get(key, 0) + numel
        counts.append(groups)
    a, b = counts
    keys = list(dict.fromkeys([*a, *b]))
    rows: list[list[Any]] = [[k, a.get(k, 0), b.get(k, 0), b.get(k, 0) - a.get(k, 0)] for k in keys]
    rows.append(["total", sum(a.values()), sum(b.values()), sum(b.values()) - sum(a.values())])
    if args.format == "json":
        keyed = [dict(zip(("module", "a", "b", "delta"), r, strict=True)) for r in rows]
        print(json.dumps({"a": args.a, "b": args.b, "rows": keyed}, indent=2))
    else:
        # Module names come from the files' headers: escaped before tabulate measures them.
        shown = [[printable(str(r[0])), *r[1:]] for r in rows]
        print(tabulate(shown, headers=["module", "A params", "B params", "B - A"], intfmt=","))
    return EXIT_OK


def _gates_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="retrofit gates",
        description="Plot the channel gates of a fine-tuned retrofitted model per stage and class "
                    "(the SE paper's view).",
        epilog="example: retrofit gates runs/se/best.pt --data data/val --out gates.png",
    )
    p.add_argument("checkpoint", help="a checkpoint written by retrofit.finetune.fit (last.pt or best.pt), or a save "
                   "(.safetensors, folder, or hf-hub:ORG/NAME on the Hugging Face Hub)")
    p.add_argument("--data", metavar="DIR", required=True, help="ImageFolder split to run on (DIR/CLASS/*.jpg)")
    p.add_argument("--out", default="gates.png", help="PNG to write (default: gates.png)")
    p.add_argument("--json", metavar="FILE", help="also write the per-site summary and per-class values as JSON")
    p.add_argument("--samples", type=_count, default=512,
                   help="images to run, at least 1 (a fixed random subset; default 512)")
    p.add_argument("--batch-size", type=_count, default=128, help="images per batch, at least 1 (default 128)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: a GPU if present)")
    p.add_argument("--trust-code", action="store_true",
                   help="allow the code the file names (a model file, an attention class); only for files you trust")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _gates(argv: Sequence[str]) -> int:
    """``retrofit gates CHECKPOINT --data DIR --out plot.png``."""
    import importlib.util

    from .distributed import choose_device

    args = _gates_parser().parse_args(argv)
    missing = next((m for m in ("matplotlib",) if importlib.util.find_spec(m) is None), None)
    if missing:  # the plot needs the `train` extra
        raise RetrofitError(f"retrofit gates needs the Python package {missing!r}, which is not installed; "
                            "install the train extra: pip install -e '.[train]'")
    _check_not_empty("--out", args.out)
    if args.json is not None:
        _check_not_empty("--json", args.json)
    try:
        device = choose_device(args.device)
    except RuntimeError as e:
        raise OptionError(f"--device {args.device!r} is not a device ({first_line(e)}); use cpu, cuda or cuda:N") from e
    _check_device(args.device, device)
    # Python's warnings (a save written with other package versions, ...) are collected and
    # printed once, as one line each, after the output, as for the main command.
    with warnings.catch_warnings(record=True) as caught:
        code = _run_gates(args, device)
    _print_warnings(caught, ())
    return code


def _check_device(text: str | None, device: Any) -> None:
    """Refuse a device this machine does not have, before anything is loaded onto it.

    Raises:
        OptionError: a CUDA (or Apple MPS) device and none here, or a CUDA index past the last.
    """
    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {text!r}: no CUDA device is available here (torch.cuda.is_available() is "
                              "False); use --device cpu, or leave --device out to use a GPU only when there is one")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise OptionError(f"--device {text!r}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                              f"(cuda:0 to cuda:{count - 1}); use one of them, or --device cpu")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {text!r}: no Apple MPS device is available here; use --device cpu")


def _run_gates(args: argparse.Namespace, device: Any) -> int:
    """The work of ``retrofit gates`` once its arguments are checked."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from .build import load
    from .data import imagefolder_dataset
    from .gates import plot_gates, record_gates

    model = load(args.checkpoint, trust_code=args.trust_code, map_location=device)
    try:
        dataset = imagefolder_dataset(args.data, model)
    except OSError as e:  # ImageFolder: no class folder, no image
        raise DataError(f"--data {args.data}: {first_line(e)}; expected {args.data}/CLASS/*.jpg") from e
    n = min(args.samples, len(dataset))
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].sort().values
    loader = DataLoader(Subset(dataset, pick.tolist()), batch_size=args.batch_size)
    record = record_gates(model, loader, classes=dataset.classes)
    try:
        out = plot_gates(record, args.out, title=f"{Path(args.checkpoint).name}: channel gates per class "
                                                 f"({record.num_images} images)")
        if args.json:
            Path(args.json).write_text(json.dumps(record.to_dict(values=True), indent=2))
    except OSError as e:
        raise SaveError(f"cannot write {e.filename or args.out!r}: {e.strerror or first_line(e)}") from e
    print(printable_lines(record.summary()))
    print()
    print(printable(f"wrote {out}"))
    if args.json:
        print(printable(f"wrote {args.json}"))
    sys.stdout.flush()  # the output, then the warnings
    return EXIT_OK


_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"list": _list, "diff": _diff, "gates": _gates}


def _message_line(e: BaseException) -> str:
    r"""The first line of an exception's message, broken at ``"\n"`` only: a ``"\r"``, or
    a C1 line break (``"\x85"``) inside a name quoted from a file, is escaped by
    :func:`_fail`, not taken as the end of the message (as ``str.splitlines`` would)."""
    return str(e).strip().split("\n", 1)[0].rstrip("\r") or type(e).__name__


def _fail(code: int, prog: str, message: str, debug: bool) -> int:
    """The one line of a failed command (after the traceback, with --debug)."""
    if debug:
        print(printable_lines(traceback.format_exc().rstrip("\n")), file=sys.stderr)
    # The message quotes text read from files (names, versions, recipe fields): escaped.
    print(f"{prog}: {printable(message)}", file=sys.stderr)
    return code


def _stdout_closed() -> int:
    """Python's recipe for a reader that went away (docs: "Note on SIGPIPE"): point stdout at
    devnull, so that the flush at exit does not fail again, and stop quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (a test's capture)
        pass
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code. The one place that decides it:

    * 0: done; 1: the identity check failed (the command itself says so);
    * 2: a :class:`~retrofit.errors.RetrofitError`, a user's mistake or missing network:
      one line, ``retrofit: error: ...``;
    * 3: any other exception, a bug in retrofit: one line that says so;
    * 141: stdout was closed by its reader (``retrofit list | head -1``); 130: Ctrl-C.

    ``--debug`` prints the traceback before the line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    prog = f"retrofit {argv[0]}" if argv and argv[0] in _COMMANDS else "retrofit"
    try:
        if argv and argv[0] in _COMMANDS:
            code = _COMMANDS[argv[0]]([a for a in argv[1:] if a != "--debug"])
        elif "--version" in argv:
            code = _version()
        else:
            code = _run_model(build_parser().parse_args(argv))
        sys.stdout.flush()  # a reader that went away shows here, not in the flush at exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RetrofitError as e:
        return _fail(EXIT_USAGE, prog, f"error: {_message_line(e)}", debug)
    except Exception as e:
        return _fail(EXIT_INTERNAL, prog, f"internal error: {type(e).__name__}: {_message_line(e)} -- this is a bug "
                     "in retrofit; rerun with --debug for the traceback and report it", debug)


if __name__ == "__main__":
    sys.exit(main())
