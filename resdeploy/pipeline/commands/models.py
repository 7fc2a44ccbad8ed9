from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the architectures with parameter counts and residual blocks")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from resdeploy.models import create_model, describe, list_models

    rows = []
    for name in list_models():
        m = create_model(name)
        blocks = m.residual_blocks()
        kinds = sorted({b.kind for b in blocks})
        rows.append({"name": name, "params": sum(p.numel() for p in m.parameters()), "residual_blocks": len(blocks),
                     "shortcuts": kinds, "input": list(m.input_spec.shape), "family": describe(name)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'architecture':<17} {'params':>12} {'res. blocks':>11}  {'input':<11} {'shortcuts':<28} family")
    for r in rows:
        print(f"{r['name']:<17} {r['params']:>12,} {r['residual_blocks']:>11}  {'x'.join(map(str, r['input'])):<11} "
              f"{','.join(r['shortcuts']) or '-':<28} {r['family']}")
    return 0
