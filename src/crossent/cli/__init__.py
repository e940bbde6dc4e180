"""``crossent`` command line: ``crossent demo | bench | env``.
Design notes: ``docs/design.md``, section ``crossent.cli``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("crossent.cli.demo", "train small classifiers on bundled data and plot exact loss curves"),
    "bench": ("crossent.cli.bench", "measure crossent against torch eager / torch.compile"),
    "env": ("crossent.cli.env", "print versions, devices and available backends"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="crossent", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ._checks import UsageError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UsageError as exc:
        print(f"crossent {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
