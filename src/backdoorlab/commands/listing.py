"""`backdoorlab list`: every registered method with its family, paper, data needed and options."""

from __future__ import annotations

import argparse
import json


def cmd_list(args: argparse.Namespace) -> int:
    from backdoorlab import registry

    ms = registry.methods(args.family)
    if args.json:
        print(json.dumps([m.describe() for m in ms], indent=2, default=str))
        return 0
    for family in registry.FAMILIES:
        group = [m for m in ms if m.family == family]
        if not group:
            continue
        print(f"{family}: {registry.FAMILIES[family]}")
        for m in group:
            print(f"  {m.name:14s} {m.summary}")
            print(f"  {'':14s} {m.paper}; needs {', '.join(m.needs) or 'no data (the model alone)'}")
            if args.verbose:
                if m.paper_setting:
                    print(f"  {'':14s} paper's setting: {m.paper_setting}")
                for o in m.describe()["options"]:
                    rng = f" [{o['range']}]" if o["range"] else ""
                    print(f"  {'':16s}--{o['name'].replace('_', '-')} ({o['type']}, default "
                          f"{o['default']}){rng}: {o['help']}")
    return 0


def register(sub) -> None:
    from backdoorlab import registry

    p = sub.add_parser("list", help="list the registered methods (repairs …) with paper and data needed")
    p.add_argument("--family", choices=list(registry.FAMILIES), help="only this family")
    p.add_argument("-v", "--verbose", action="store_true", help="also every option with default and range")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)
