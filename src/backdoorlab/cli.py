"""The `backdoorlab` command line. It parses, calls the API and prints; it holds no algorithm.

Commands live in `backdoorlab.commands`, one module per family, each with ``register(sub)``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from backdoorlab import __version__
from backdoorlab.commands.common import Parser
from backdoorlab.errors import BadInput

ORDER = ["core"]  # modules registered first (help lists commands in registration order)


def build_parser() -> Parser:
    p = Parser(prog="backdoorlab", description="Backdoor attacks and defenses for neural "
               "networks, on your own files, on a CPU.",
               epilog="Run 'backdoorlab COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"backdoorlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    import backdoorlab.commands as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "common"]
    for name in sorted(names, key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n)):
        importlib.import_module(f"backdoorlab.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        if args.command:
            parser.exit(2, f"backdoorlab {args.command}: error: name an action (see --help)\n")
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial outputs were kept", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (try a smaller batch or data set)", file=sys.stderr)
        return 2
