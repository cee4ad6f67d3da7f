"""Method benchmark: the training-step time of every compatible-training method relative to `independent`, on the
same batch, in one process, through the trainer's own `Trainee` (backbone forward under the trainer's autocast, the
method, backward, SGD step). Targets (issue 5): ≤ 1.15× independent; NCCL and AdvBCT ≤ 1.35×.

CPU-tier shapes: cpu_resnet at 32×32, dim 128, batch 128, a new ArcFace head over 919 classes, an old softmax model
(394 classes), NCCL queue K = 8192 (full, as at steady state). Methods are timed in interleaved rounds, in a new random order each round, and a ratio is the median over rounds of
the ratio to `independent` measured in the same round (its interquartile range over rounds is written too), so load
from other processes on the machine hits all of them alike; the ratio uses the process CPU time of each step (one thread, so it is the
step's compute and is barely affected by other processes on a shared machine), the wall time is reported too. Two old-feature sources are measured: `online` (φ_o on the augmented
batch, the CPU-tier recipe with crops; a BatchNorm-folded copy of the old backbone in the side dtype, `Method.old_feats`) and `cached` (flip-only augmentation, the face recipe). UniBCT's refresh is an
epoch-level cost, reported separately. Writes benchmarks/results/methods.json with the machine description.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_methods.py [--quick]
"""
import argparse, functools, os, random, statistics, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("BCTNB_NO_PROGRESS", "1")
import numpy as np
import torch

from bctnb.core import save_json, select_precision
from bctnb.runs import environment
from bctnb.data import ArrayDataset, BatchAugment
from bctnb.losses import Batch, MethodContext, available_methods, get_method
from bctnb.models import create_backbone, create_head
from bctnb.train import Trainee

OUT = Path(__file__).resolve().parent / "results" / "methods.json"
TARGET = {"nccl": 1.35, "advbct": 1.35}
OLD_FORWARD = "old forward"     # not a method: φ_o on the batch (no grad, BN folded, side dtype), timed like one


@functools.lru_cache(maxsize=2)
def _images(n, size, seed):
    "The synthetic training images (made once per shape: at the GPU benchmark's shape they are 2.5 GB)"
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def build(name, source, n, c_new, c_old, b, dim, amp, cache, seed=0, device="cpu", backbones=("cpu_resnet", "cpu_resnet"),
          size=32, old_head="softmax", head_sm=(30.0, 0.3), clip=None, channels_last=False, compile_backbone=False):
    '''One method's training step on a fixed batch, through the trainer's `Trainee` (and GradScaler on CUDA). The
    defaults are the CPU tier's shapes; `benchmarks/bench_gpu.py` passes the paper's (iResNet-18 → iResNet-50 at 112²).'''
    torch.manual_seed(seed)
    labels = np.arange(n) % c_new + 1000                  # global labels of the new training set
    ds = ArrayDataset(_images(n, size, seed), labels)
    prec = select_precision(device, amp=amp); dev = prec.device
    old = create_backbone(backbones[0], dim=dim).to(dev); old_head = create_head(old_head, dim, c_old).to(dev)
    new = create_backbone(backbones[1], dim=dim).to(dev)
    head = create_head("arcface", dim, c_new, s=head_sm[0], m=head_sm[1]).to(dev)
    aug = BatchAugment(flip=True, rrc_scale=None, jitter=0.0) if source == "cached" else BatchAugment()
    old_classes = np.arange(c_old) + 1000 - c_old // 2     # half seen, half not: BCT synthesizes rows
    ctx = MethodContext(old_backbone=old, old_head=old_head, old_info={"label_map": old_classes, "dim": dim},
                        new_backbone=new, new_head=head, train_set=ds, train_global_labels=labels, precision=prec,
                        seed=seed, augment=aug, epochs=25, steps_per_epoch=n // b, batch_size=b, cache_dir=cache,
                        device=dev)
    # the old forward alone is timed through an online method's own `old_feats` (L2's: it adds nothing to the forward)
    if name == OLD_FORWARD: m = get_method("l2", old_source="online")
    else: m = get_method(name, **({"old_source": source} if "old_source" in get_method(name).hparams else {}))
    t = time.perf_counter(); m.setup(ctx); setup_s = time.perf_counter() - t
    t = time.perf_counter(); m.on_epoch_start(ctx.epochs - 1, ctx); epoch_s = time.perf_counter() - t
    if hasattr(m, "push"):                                 # NCCL at steady state: a full queue of K entries
        qg = torch.Generator().manual_seed(2)
        m.push(torch.nn.functional.normalize(torch.randn(m.K, dim, generator=qg), dim=1).to(dev),
               torch.nn.functional.normalize(torch.randn(m.K, c_new, generator=qg), dim=1).to(dev),
               torch.randint(0, c_new, (m.K,), generator=qg).to(dev))
    m.to(dev)
    trainee = Trainee(torch.compile(new) if compile_backbone else new, head, m, prec, frozen=[old, old_head])
    opt = torch.optim.SGD([p for p in trainee.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    scaler = prec.scaler()
    trainee.train()
    # the same batch for every method
    x, flipped = aug(ds.images[:b].to(dev), torch.Generator().manual_seed(1))
    if channels_last:
        for mod in (old, new): mod.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.as_tensor(labels[:b]).to(dev)
    fields = dict(labels=y - 1000, global_labels=y, index=torch.arange(b, device=dev), flipped=flipped,
                  epoch=ctx.epochs - 1, step=100, total_steps=25 * (n // b), steps_per_epoch=n // b, epochs=ctx.epochs)

    def step():
        terms = trainee(x, **fields); loss = sum(terms.values())
        opt.zero_grad(set_to_none=True); scaler.scale(loss).backward()
        if clip:                                           # the trainer's clip_grad (paper face preset: 5)
            scaler.unscale_(opt); torch.nn.utils.clip_grad_norm_(new.parameters(), clip)
        scaler.step(opt); scaler.update()
    if name == OLD_FORWARD:                                # the online old features alone: what every online method adds
        batch = Batch(images=x, feats=torch.zeros(b, dim, device=dev), head=head, **fields)
        def step(): m.old_feats(batch)
    return step, setup_s, epoch_s, getattr(m, "source", None) == "online" and name != OLD_FORWARD


def main(quick=False, amp=True):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    n, b, dim, c_new, c_old = (1024, 64, 128, 919, 394) if quick else (2048, 128, 128, 919, 394)
    rounds, steps = (2, 2) if quick else (20, 3)
    names = available_methods()
    per_source = {"online": names + [OLD_FORWARD], "cached": [m for m in names if "old_source" in get_method(m).hparams]}
    cache = Path(tempfile.mkdtemp())
    runners, info = {}, {}
    for source, ms in per_source.items():
        for name in ms:
            key = name if source == "online" else f"{name} (cached)"
            if source == "online" and name not in ("independent", OLD_FORWARD) and "old_source" not in get_method(name).hparams and key in runners: continue
            step, setup_s, epoch_s, online = build(name, source, n, c_new, c_old, b, dim, amp, cache)
            step(); step()                                  # warm-up
            runners[key] = step; info[key] = {"setup_s": round(setup_s, 3), "epoch_hook_s": round(epoch_s, 3), "old_forward_online": online}
    # rounds: every method `steps` times, in a new (seeded) random order each round, so no method always runs right after
    # the same neighbour; a method's ratio is the median over rounds of (its median step / independent's median step in
    # the same round): paired within a round, so slow drifts of the machine cancel
    cpu, wall = {k: [[] for _ in range(rounds)] for k in runners}, {k: [[] for _ in range(rounds)] for k in runners}
    keys = list(runners)
    for r in range(rounds):
        for k in random.Random(r).sample(keys, len(keys)):
            for _ in range(steps):
                t, c = time.perf_counter(), time.process_time(); runners[k]()
                cpu[k][r].append(time.process_time() - c); wall[k][r].append(time.perf_counter() - t)
    med = lambda d, k, r: statistics.median(d[k][r])
    rows = {}
    for k in runners:
        spread = [med(cpu, k, r) / med(cpu, "independent", r) for r in range(rounds)]
        ratio = statistics.median(spread)
        ratio_w = statistics.median(med(wall, k, r) / med(wall, "independent", r) for r in range(rounds))
        # online methods: the same ratio without the old forward (its in-round time subtracted): the method's own cost
        net = statistics.median((med(cpu, k, r) - med(cpu, OLD_FORWARD, r)) / med(cpu, "independent", r) for r in range(rounds)) \
            if info[k]["old_forward_online"] else None
        name = k.split(" ")[0]; target = None if k == OLD_FORWARD else TARGET.get(name, 1.15)
        rows[k] = {"step_cpu_s": round(statistics.median(sum(cpu[k], [])), 4), "ratio": round(ratio, 3),
                   "ratio_q25_q75": [round(q, 3) for q in statistics.quantiles(spread, n=4)[::2]] if rounds > 1 else None,
                   "ratio_without_old_forward": None if net is None else round(net, 3),
                   "step_wall_s": round(statistics.median(sum(wall[k], [])), 4), "ratio_wall": round(ratio_w, 3),
                   "target": target, "ok": None if target is None else ratio <= target, **info[k]}
    fmt = lambda v, spec: "–".rjust(len(format(0.0, spec))) if v is None else format(v, spec)
    print(f"{'method':22s} {'cpu ms':>7s} {'ratio':>6s} {'w/o φo':>6s} {'wall ms':>8s} {'ratio':>6s} {'target':>6s}  ok   setup s  epoch-hook s")
    for k, r in rows.items():
        ok = "–  " if r["ok"] is None else ("yes" if r["ok"] else "NO ")
        print(f"{k:22s} {1000 * r['step_cpu_s']:7.1f} {r['ratio']:6.3f} {fmt(r['ratio_without_old_forward'], '6.3f')} "
              f"{1000 * r['step_wall_s']:8.1f} {r['ratio_wall']:6.3f} {fmt(r['target'], '6.2f')}  {ok} {r['setup_s']:8.2f} {r['epoch_hook_s']:12.2f}")
    res = {"benchmark": "method step time relative to independent (same batch, one process)",
           "shapes": {"train_images": n, "batch": b, "dim": dim, "new_classes": c_new, "old_classes": c_old, "image": "3x32x32",
                      "backbone": "cpu_resnet", "new_head": "arcface", "old_head": "softmax", "amp": "bf16 autocast" if amp else "fp32",
                      "rounds": rounds, "steps_per_round": steps, "threads": torch.get_num_threads()},
           "methods": rows, "environment": environment()}
    if not quick: save_json(OUT, res)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("--quick", action="store_true"); ap.add_argument("--fp32", action="store_true")
    a = ap.parse_args()
    main(a.quick, amp=not a.fp32)
