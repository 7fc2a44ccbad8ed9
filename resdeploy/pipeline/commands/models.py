from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the architectures with parameter counts, residual blocks and short paths")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from collections import Counter

    from resdeploy.models import create_model, describe, list_models

    rows = []
    for name in list_models():
        m = create_model(name)
        blocks = m.residual_blocks()
        kinds = sorted({b.kind for b in blocks})
        # Every short path the checks look for (residual adds and the other families' concat, gate, scaled add and
        # mean joins), so a DenseNet does not read as a net with nothing to check.
        paths = Counter(p.kind for p in m.short_paths())
        rows.append({"name": name, "params": sum(p.numel() for p in m.parameters()), "residual_blocks": len(blocks),
                     "shortcuts": kinds, "short_paths": dict(sorted(paths.items())), "input": list(m.input_spec.shape),
                     "family": describe(name)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'architecture':<17} {'params':>12} {'res. blocks':>11}  {'input':<11} {'shortcuts':<20} {'short paths':<18} family")
    for r in rows:
        paths = ",".join(f"{n} {k}" for k, n in r["short_paths"].items()) or "-"
        print(f"{r['name']:<17} {r['params']:>12,} {r['residual_blocks']:>11}  {'x'.join(map(str, r['input'])):<11} "
              f"{','.join(r['shortcuts']) or '-':<20} {paths:<18} {r['family']}")
    return 0
