"""One-off migration (issue 14, stable run ids): rename every committed study result and zoo model to the new ids.

Before: a run id hashed the whole TrainConfig, including runtime fields and the old model's *absolute path*, and job ids
carried ':' and '=' (not portable to Windows). Now a run id hashes `TrainConfig.identity()` (runtime fields out, the
old model named by its own run id) and job ids go through `core.safe_name`. Nothing that was trained changes: run ids
enter neither seeds nor training.

What the script does, checking each step against the legacy ids:
1. rebuilds every old model's config from the study plans and checks it against the legacy old-run id;
2. for each result file reports/*/runs/*.json: checks that its recorded config hashes to its legacy new-run id,
   computes the new ids, keeps the legacy ones under `migrated_from`, and `git mv`s the file to its new job id;
3. rewrites the job ids in each study's results.csv;
4. writes reports/model_zoo.json: each zoo model under its new id, with the commit and path that hold it in the
   repository's history and the sha256 of every file (the weights themselves leave the working tree).
Idempotent: a result that has `migrated_from` is left alone, and an existing zoo index is kept. Run from the repository root: python scripts/migrate_run_ids.py
"""
import subprocess, sys
from pathlib import Path
from bctnb.core import config_hash, load_json, save_json, safe_name, sha256_file
from bctnb.study import OLD_VARIANTS, SCALES, plan_study
from bctnb.zoo import zoo_markdown
from bctnb.train import TrainConfig

ROOT = Path.cwd()
ZOO = ROOT/"reports"/"model_zoo"

def legacy_old_map() -> dict:
    "legacy old-run id → new old-run id, for every old model any study plan can make"
    out = {}
    for scale in ("smoke", "quick", "cpu"):
        for v in OLD_VARIANTS:
            for seed in range(5):
                for sc in ("open-class", "open-data"):
                    cfg = plan_study(scale, [sc], ["independent"], seeds=[seed], old_variants=[v])[0].config()
                    out[f"train_old-{config_hash(cfg.to_dict())}"] = cfg.run_id
    return out

def new_ids(cfg_dict: dict, legacy_new: str, new_old: str) -> str:
    "The new new-run id of a recorded config, after checking that the config hashes to its legacy id"
    assert f"train_new-{config_hash(cfg_dict)}" == legacy_new, f"{legacy_new}: recorded config does not hash to it"
    return f"train_new-{config_hash(TrainConfig.from_dict(cfg_dict).identity(old_id=new_old))}"

def migrate_results(old_map: dict) -> dict:
    "Rename result files; returns legacy job id → new job id"
    jobs = {}
    for f in sorted(ROOT.glob("reports/*/runs/*.json")):
        r = load_json(f)
        if "migrated_from" in r: continue
        assert r["old_run"] in old_map, f"{f}: old run {r['old_run']} is not an old model of any study plan"
        prefix, h = r["job"].rsplit("-", 1)
        assert prefix == r["label"].replace("/", "_"), f"{f}: job id {r['job']} does not match its label {r['label']}"
        new_old = old_map[r["old_run"]]
        new = {"job": f"{safe_name(r['label'])}-{h}", "new_run": new_ids(r["config"], r["new_run"], new_old), "old_run": new_old}
        r = {**r, **new, "config": {**r["config"], "old_run": new_old},
             "migrated_from": {k: r[k] for k in ("job", "new_run", "old_run")} | {"config.old_run": r["config"]["old_run"]}}
        dst = f.with_name(f"{new['job']}.json")
        jobs[r["migrated_from"]["job"]] = new["job"]
        if dst != f: subprocess.run(["git", "mv", str(f), str(dst)], check=True)
        save_json(dst, r)
    return jobs

def migrate_csv(jobs: dict):
    for f in sorted(ROOT.glob("reports/*/results.csv")):
        text = f.read_text()
        for a, b in jobs.items(): text = text.replace(f"{a},", f"{b},")
        f.write_text(text)

def zoo_index(old_map: dict) -> dict:
    "reports/model_zoo/<legacy id>/ → index entries under the new ids, described from the seed-0 result files"
    results = [load_json(f) for f in sorted(ROOT.glob("reports/*/runs/*.json"))]
    entries = {}
    for d in sorted(ZOO.iterdir()):
        rc = load_json(d/"config.json")
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", str(d.relative_to(ROOT))], capture_output=True,
                                text=True, check=True).stdout.strip()
        files = {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}
        if rc["name"] == "train_old":
            rid = TrainConfig.from_dict(rc["config"]).run_id
            assert old_map.get(d.name) == rid, f"{d.name}: not the old model of any study plan"
            r = next(r for r in results if r["migrated_from"]["old_run"] == d.name and not r.get("reused_from"))
            meta = {"role": "old", "method": None, "scenario": f"old split of {r['old_label'].split('/')[1]} scenarios",
                    "mAP": f"{r['metrics']['old/old']['mAP']:.3f} (old/old)"}
        else:
            rel = [r for r in results if r["migrated_from"]["new_run"] == d.name]
            r = next((r for r in rel if not r.get("reused_from")), rel[0])
            rid = r["new_run"]
            assert new_ids(rc["config"], d.name, r["old_run"]) == rid
            meta = {"role": "new", "method": r["method"], "scenario": r["scenario"], "old_run": r["old_run"],
                    "mAP": f"{r['metrics']['cross']['mAP']:.3f} (cross)"}
        entries[rid] = {"commit": commit, "path": str(d.relative_to(ROOT)), "legacy_id": d.name, "study": r["study"],
                        "old_variant": r["old_variant"], "seed": r["seed"], **meta, "files": files}
    return entries

if __name__ == "__main__":
    old_map = legacy_old_map()
    jobs = migrate_results(old_map)
    migrate_csv(jobs)
    print(f"{len(jobs)} result files migrated")
    if ZOO.exists() and not (ROOT/"reports"/"model_zoo.json").exists():   # indexed once, before the weights left the tree
        entries = zoo_index(old_map)
        save_json(ROOT/"reports"/"model_zoo.json", {"about": "bctnb model zoo: run id -> commit and path holding it in "
                  "this repository's history, sha256 of each file. Restore with `make zoo`.", "entries": entries})
        print(f"{len(entries)} zoo entries indexed; {zoo_markdown()} written")
    sys.exit(0)
