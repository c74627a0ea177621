"""Site counts of each family's real configuration, from its config alone (meta device).

    python bench/family_sites.py [--json OUT.json]

Reads bench/configs/*.json (key fields of public model cards, written by hand), builds each
architecture on the meta device with ``canfast.load(CONFIG.json)`` and prints, per model, the
number of FFN sites and neurons per component for unit ``out``, and the ``mid`` neurons.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import canfast
from canfast.sites import COMPONENTS

CONFIGS = Path(__file__).resolve().parent / "configs"


def counts(path: Path) -> dict:
    model = canfast.load(str(path))
    row: dict = {"config": path.stem, "model_type": model.hf.config.model_type}
    row["family"] = model.adapter.family
    for unit in ("out", "mid"):
        sites = model.all_sites(unit)
        row[unit] = {
            c: [
                sum(1 for s in sites if s.component == c),
                sum(s.channels for s in sites if s.component == c),
            ]
            for c in COMPONENTS
        }
        row[f"{unit}_sites"] = len(sites)
        row[f"{unit}_neurons"] = sum(s.channels for s in sites)
    experts = {s.expert for s in model.all_sites("out") if s.expert}
    row["experts_per_layer"] = len([e for e in experts if e != "shared"])
    row["shared_expert"] = "shared" in experts
    return row


def table(rows: list[dict]) -> str:
    head = "| config | model_type | " + " | ".join(COMPONENTS)
    head += " | out sites | out neurons | mid neurons |"
    lines = [head, "|" + "---|" * (len(COMPONENTS) + 5)]
    for r in rows:
        cells = []
        for c in COMPONENTS:
            n, ch = r["out"][c]
            cells.append(f"{n} / {ch:,}" if n else "-")
        experts = (
            f" ({r['experts_per_layer']} experts/layer{' + shared' if r['shared_expert'] else ''})"
            if r["experts_per_layer"]
            else ""
        )
        lines.append(
            f"| {r['config']} | {r['model_type']}{experts} | "
            + " | ".join(cells)
            + f" | {r['out_sites']:,} | {r['out_neurons']:,} | {r['mid_neurons']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    canfast.model.quiet_transformers()
    rows = [counts(p) for p in sorted(CONFIGS.glob("*.json"))]
    print("cells: sites / neurons (unit out)")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
