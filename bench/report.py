"""Re-render a saved run: ``python -m bench.report bench/out/results-*.json`` prints its table and redraws its chart
next to it (same name, .png)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.harness import Row, natural_key, table, write_chart


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.report RESULTS.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    doc = json.loads(path.read_text())
    rows = sorted((Row(**r) for r in doc["rows"]), key=lambda r: (r.workload, natural_key(r.metric)))
    base = doc["systems"][0]["name"]
    print(table(rows, base))
    for system in doc["systems"]:
        print(f"- {system['name']}: {'; '.join(system['notes'])}")
    write_chart(path.with_suffix(".png"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
