"""Add the mechanism diagnostics (issue 15: "did the mechanism act") to committed study results that predate them, and
re-render those studies' reports.

Only pairs whose models are in the model zoo can be measured (the seed-0 models of the CPU-scale studies); the other
results stay without diagnostics, and the report counts what was measured ("acted: k/n" over measured seeds). A
verdict becomes "not tested here (mechanism inert)" only when every seed was measured, so a seed-0 backfill never
changes a verdict. Each pair is restored from git history (`make zoo`), its run id checked, and measured with
`bctnb.protocols.mechanism_stats` exactly as `bctnb.study.evaluate_pair` measures new results. Nothing else in a
result file changes; the README is re-rendered with its own title, intro and scale, and the script stops if anything
but the mechanism section and the per-metric pass lists of the verdicts would change.

    python scripts/backfill_mechanism.py [--redo] [--runs FOLDER] [study ...]
    # default studies: unibct_cpu mixbct_cpu hot_refresh_cpu; --runs: take the models from a local run root (e.g.
    # runs/, where a study that just ran left them) instead of the zoo; --redo: measure again (new diagnostics)
"""
import re, sys
from pathlib import Path

from bctnb.core import load_json, save_json
from bctnb.protocols import mechanism_stats
from bctnb.report import write_report
from bctnb.runs import Run
from bctnb.study import parse_method, restore_zoo, zoo_index
from bctnb.train import TrainConfig

ROOT = Path.cwd()


def backfill(study: str, redo: bool = False, runs: Path | None = None) -> int:
    d, idx, n = ROOT/"reports"/study, (None if runs else zoo_index(ROOT)), 0
    have = (lambda rid: (runs/rid/"model").is_dir()) if runs else (lambda rid: rid in idx)
    for f in sorted((d/"runs").glob("*.json")):
        r = load_json(f, "study result")
        if ("mechanism" in r["metrics"] and not redo) or not have(r["new_run"]) or not have(r["old_run"]): continue
        new, old = ((runs/rid if runs else restore_zoo([rid])[0]) for rid in (r["new_run"], r["old_run"]))
        cfg = TrainConfig.from_dict(Run(new).config)
        name, kw = parse_method(r["method"])
        r["metrics"]["mechanism"] = mechanism_stats(old/"model", new/"model", cfg, name, {**cfg.method_kw, **kw})
        save_json(f, r); n += 1
        print(f"{study}: {r['label']}: {r['metrics']['mechanism'].get('acted')}", flush=True)
    return n


def rerender(study: str):
    d = ROOT/"reports"/study
    before = (d/"README.md").read_text()
    m = re.match(r"# (.*?)\n\n(.*?)\n\nScale `(\w+)`", before, re.S)
    write_report(study, d, title=m.group(1), intro=m.group(2), scale=m.group(3))
    after = (d/"README.md").read_text()
    # the new section, the render line, and the per-metric pass lists (an inert method moves from "failing" to
    # "not tested here (mechanism inert)" once every seed is measured) may change; nothing else
    strip = lambda s: re.sub(r"## Did the mechanism act\n.*?\n(?=Pass marks)|- report rendered on: [^\n]*|"
                             r"- \[[^\]]*\] On (mAP|R@1|TAR), passing in every seed: [^\n]*", "", s, flags=re.S)
    if strip(after) != strip(before):
        raise SystemExit(f"{study}: re-rendering changed more than the mechanism section; inspect reports/{study}")


if __name__ == "__main__":
    args = sys.argv[1:]
    redo = "--redo" in args              # measure again (after a rule changed or a diagnostic was added)
    runs = Path(args[args.index("--runs") + 1]).resolve() if "--runs" in args else None
    rest = [a for i, a in enumerate(args) if a != "--redo" and a != "--runs" and (i == 0 or args[i - 1] != "--runs")]
    for s in rest or ["unibct_cpu", "mixbct_cpu", "hot_refresh_cpu"]:
        print(s, backfill(s, redo, runs), "results measured"); rerender(s)
