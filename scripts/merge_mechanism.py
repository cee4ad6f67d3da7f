"""Copy the mechanism diagnostics of a re-run study into the committed study whose numbers it reproduced, then
re-render the committed report (issue 15: every committed report gets its "Did the mechanism act" table).

A result is updated only when the re-run has the same job id and every old/old, self and cross number is identical;
otherwise the script stops and changes nothing.

    python scripts/merge_mechanism.py reports/local/unibct_quick reports/unibct_quick
"""
import sys
from pathlib import Path

from bctnb.core import load_json, save_json
from bctnb.study import SIDES

sys.path.insert(0, str(Path(__file__).parent))
from backfill_mechanism import rerender

src, dst = (Path(a) for a in sys.argv[1:3])
updates = []
for f in sorted((dst/"runs").glob("*.json")):
    r, g = load_json(f, "study result"), src/"runs"/f.name
    if not g.exists(): raise SystemExit(f"{f.name}: no re-run result in {src}")
    n = load_json(g, "study result")
    if any(n["metrics"][s] != r["metrics"][s] for s in SIDES):
        raise SystemExit(f"{f.name}: the re-run's numbers differ from the committed ones; nothing changed")
    r["metrics"]["mechanism"] = n["metrics"]["mechanism"]; updates.append((f, r))
for f, r in updates: save_json(f, r)
print(f"{len(updates)} results updated"); rerender(dst.name)
