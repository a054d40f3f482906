"""`phigate catalog show`: the PHI classification as resolved in each target's catalog."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from phigate.cli.common import EXIT_OK, target_names


def add_parsers(sub: Any) -> None:
    cat = sub.add_parser("catalog", help="PHI classification as resolved in the database")
    cat_sub = cat.add_subparsers(dest="catalog_command", required=True, metavar="SUBCOMMAND")
    show = cat_sub.add_parser(
        "show", help="print classified columns and where each rule applies (reads the catalog)"
    )
    show.add_argument("--config", required=True, type=Path, metavar="FILE")
    show.add_argument("--target", metavar="NAME", help="default: every target")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(run=_catalog_show)


def _catalog_show(args: argparse.Namespace) -> int:
    from phigate.config import load_config
    from phigate.masking.classification import load_catalog

    config = load_config(args.config)
    names = target_names(config, args.config, args.target)
    snapshots = [load_catalog(config, name, identifiers=False) for name in names]
    if args.json:
        print(json.dumps([s.to_json() for s in snapshots], indent=2, ensure_ascii=False))
        return EXIT_OK
    if not config.phi.columns:
        print("no columns are classified ([phi.columns] is empty)")
        return EXIT_OK
    for snap in snapshots:
        print(f"target {snap.target}:")
        fns = snap.pseudonym_functions
        if fns is not None:
            print(f"  pseudonym functions: {'ready' if fns.ready else 'NOT READY'}: {fns.summary}")
            for warning in fns.warnings:
                print(f"    warning: {warning}")
        rels = sorted(snap.relations.values(), key=lambda r: (r.schema, r.name))
        origins = ("configured", "partition", "child", "ancestor", "view")
        for origin in origins:
            group = [r for r in rels if r.origin == origin]
            if not group:
                continue
            print(f"  {origin} relations:")
            for r in group:
                name = f"{r.schema}.{r.name}"
                via = ", ".join(
                    f"{snap.relations[o].schema}.{snap.relations[o].name}"
                    for o in r.derived_from
                    if o in snap.relations
                )
                suffix = f" (from {via})" if via else ""
                if r.refuse_reason is not None:
                    print(f"    {name} [oid {r.oid}]{suffix}: REFUSED: {r.refuse_reason}")
                    continue
                print(f"    {name} [oid {r.oid}]{suffix}")
                for c in r.classified_columns():
                    assert c.rule is not None
                    print(
                        f"      {c.name} (attnum {c.attnum}, {c.type_name}): "
                        f"kind {c.rule.kind}, mask {c.rule.mask_spec}"
                    )
    return EXIT_OK
