"""GPU benchmark (issue 17): the paper's face recipe on one NVIDIA GPU, measured side by side in one process.

1. **Peak**: the rate of a large fp16 and bf16 matmul on this device (what "utilisation" below is measured against,
   next to the vendor's dense peak where the device is known).
2. **Training throughput** of the old (iResNet-18) and the new (iResNet-50) recipe at 112×112, 512-d ArcFace
   (s = 64, m = 0.5) over 65,536 classes, batch 128, through the trainer's own step (`Trainee`, fp16 autocast +
   GradScaler, gradient clipping at 5 as the face preset): images/s, FLOPs per step (torch's FlopCounterMode: matmuls
   and convolutions, forward and backward) and the achieved share of the peak. The same step with channels_last
   (and, with `--compile`, torch.compile of the backbone) beside it: an option is worth turning on only where it is
   measured faster here.
3. **Every method's step time relative to `independent`** at that shape (old iResNet-18 → new iResNet-50, one training
   image per class, 65,536 images; old features cached where a method can, as the flip-only face recipe allows; NCCL
   with a full K = 8192 queue), paired in rounds as in `bench_methods.py`.
4. **Input pipeline**: a synthetic RecordIO in MS1MV3's exact layout (112×112 JPEGs, identity records, `property`),
   read by the trainer's own feed (`bctnb.feed._Feed`: DataLoader workers, pinned memory) and copied to the GPU with
   the flip augmentation on the device — images/s with no workers and with the automatic worker count.
5. **insightface arcface_torch's training step** on the same batch, rebuilt from its published code (not vendored):
   the backbone under fp16 autocast except its final fc/BatchNorm1d in fp32, PartialFC v2 at sample rate 1 (normalised
   embeddings and weights, fp16 logits, then fp32 and clamped to [−1, 1]), the ArcFace margin applied in place under
   no_grad (arccos, +m on the target, cos: the gradient passes as if through s·cos θ), ×s, cross-entropy, GradScaler,
   unscale, clip_grad_norm_(backbone, 5), SGD (lr 0.1, momentum 0.9, weight decay 5e-4 on every parameter).

    python3 benchmarks/bench_gpu.py            # an NVIDIA machine: writes benchmarks/results/gpu.json
    python3 benchmarks/bench_gpu.py --smoke    # anywhere (CPU allowed): tiny shapes, checks the code, writes nothing
"""
import argparse, io, os, statistics, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("BCTNB_NO_PROGRESS", "1")
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import build                                    # noqa: E402  (the same step builder as on CPU)
from bctnb.core import save_json                                    # noqa: E402
from bctnb.losses import available_methods                          # noqa: E402
from bctnb.models import create_backbone                            # noqa: E402
from bctnb.runs import environment                                  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "gpu.json"
# dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by device-name substring
VENDOR_PEAK = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}
FULL = dict(n=65536, b=128, dim=512, c_new=65536, c_old=32768, size=112, warmup=3, iters=10, rounds=2, method_iters=5,
            rec_images=12800)
SMOKE = dict(n=512, b=8, dim=64, c_new=512, c_old=256, size=112, warmup=1, iters=1, rounds=1, method_iters=1, rec_images=256)


def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)

def per_step(step, dev, warmup, iters) -> float:
    "Seconds per call of `step` after `warmup` calls, the device drained before and after"
    for _ in range(warmup): step()
    sync(dev); t = time.perf_counter()
    for _ in range(iters): step()
    sync(dev); return (time.perf_counter() - t) / iters

def step_flops(step) -> int:
    "FLOPs of one call (matmuls and convolutions, forward and backward), counted by torch"
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc: step()
    return int(fc.get_total_flops())

def matmul_rate(dev, dtype, n, iters) -> float:
    "FLOP/s of an n×n @ n×n matmul in `dtype`"
    a, b = (torch.randn(n, n, device=dev).to(dtype) for _ in range(2))
    s = per_step(lambda: a @ b, dev, 2, iters)
    return 2 * n ** 3 / s

def vendor_peak(name: str):
    return next((v for k, v in VENDOR_PEAK.items() if k in name), None)


def recipe_step(role, sh, dev, cache, channels_last=False, compile_=False):
    "The trainer's independent step for the old (iResNet-18) or new (iResNet-50) face recipe"
    bbs = ("iresnet18", "iresnet18") if role == "old" else ("iresnet18", "iresnet50")
    return build("independent", "cached", sh["n"], sh["c_new"], sh["c_old"], sh["b"], sh["dim"], True, cache,
                 device=dev.type, backbones=bbs, size=sh["size"], old_head="arcface", head_sm=(64.0, 0.5), clip=5.0,
                 channels_last=channels_last, compile_backbone=compile_)[0]


def arcface_torch_step(sh, dev, seed=0):
    "insightface arcface_torch's step (iResNet-50, PartialFC v2 at sample rate 1, ArcFace s = 64, m = 0.5), rebuilt"
    torch.manual_seed(seed)
    bb = create_backbone("iresnet50", dim=sh["dim"]).to(dev).train()
    W = torch.nn.Parameter(torch.normal(0, 0.01, (sh["c_new"], sh["dim"]), device=dev))
    opt = torch.optim.SGD([*bb.parameters(), W], lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(dev.type, init_scale=2 ** 16, growth_interval=100, enabled=dev.type == "cuda")
    amp = torch.float16 if dev.type == "cuda" else torch.bfloat16
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 256, (sh["b"], 3, sh["size"], sh["size"]), generator=g).float().div(255).sub(0.5).div(0.5)).to(dev)
    y = torch.randint(0, sh["c_new"], (sh["b"],), generator=g).to(dev)
    s, m = 64.0, 0.5

    def step():
        with torch.autocast(dev.type, dtype=amp):
            h = bb.dropout(torch.flatten(bb.bn2(bb.stages(bb.stem(x))), 1))
        emb = bb.features(bb.fc(h.float()))                              # fc + BatchNorm1d in fp32
        with torch.autocast(dev.type, dtype=amp):
            logits = F.linear(F.normalize(emb), F.normalize(W))
        logits = logits.float().clamp(-1, 1)
        with torch.no_grad():                                            # the margin, in place: no gradient of its own
            idx = torch.arange(len(y), device=dev)
            tgt = logits[idx, y].arccos_() + m
            logits.arccos_(); logits[idx, y] = tgt; logits.cos_()
        loss = F.cross_entropy(logits * s, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt); torch.nn.utils.clip_grad_norm_(bb.parameters(), 5.0)
        scaler.step(opt); scaler.update(); opt.zero_grad()
    return step


def input_pipeline(sh, dev, workdir):
    "Images/s of the trainer's feed over a synthetic MS1MV3-layout RecordIO, to the device, flip on the device"
    from PIL import Image
    from bctnb.benchmarks import write_recordio
    from bctnb.feed import _Feed, loader_workers, prepare_data
    from bctnb.train import TrainConfig, _augment
    from bctnb.core import make_generator
    rng = np.random.default_rng(0)
    base = []
    for _ in range(64):                                                  # faces-like smooth content: JPEG of a blur
        im = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        buf = io.BytesIO(); Image.fromarray(im).resize((112, 112), Image.BICUBIC).save(buf, "JPEG", quality=95)
        base.append(buf.getvalue())
    n_id = sh["rec_images"] // 10
    items = [(c, base[(c * 10 + k) % len(base)]) for c in range(n_id) for k in range(10)]
    root = Path(workdir) / "ms1m"; write_recordio(root / "train", items, identity_records=True, image_size=112)
    out = {"images": len(items), "identities": n_id, "jpeg_bytes_mean": int(np.mean([len(b) for b in base]))}
    for label, nw in (("workers_0", 0), ("workers_2", 2), ("workers_auto", None)):
        cfg = TrainConfig.make("paper", "old", dataset="ms1mv3_rec", data_root=str(root), in_memory=False,
                               num_workers=nw, device=dev.type, batch_size=sh["b"], scenario="open-class", old_ratio=0.9)
        data = prepare_data(cfg); aug = _augment(cfg)
        feed = _Feed(data, cfg, dev)
        order = np.arange(len(data.positions)); spe = len(order) // sh["b"]
        t, seen = None, 0
        for bi, (xu8, pos) in enumerate(feed.batches(order, sh["b"], 0, spe)):
            x, _ = aug(xu8.to(dev, non_blocking=True), make_generator(0, "augment", 0, bi, 0))
            if bi == 1: sync(dev); t = time.perf_counter()                # the first batch starts the workers
            elif bi > 1: seen += len(pos)
        sync(dev); feed.close()
        out[label] = {"workers": loader_workers(cfg, dev), "img_s": round(seen / (time.perf_counter() - t), 1)}
    return out


def main(smoke=False, compile_=False):
    sh = SMOKE if smoke else FULL
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not smoke and dev.type != "cuda":
        print("bench_gpu.py: no NVIDIA GPU here, nothing measured (benchmarks/gpu_check.sh runs it on a lent device; "
              "--smoke checks the code on a CPU)"); return None
    cache = Path(tempfile.mkdtemp())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    res = {"benchmark": "paper face recipe on one GPU (issue 17)", "device": name, "shapes": sh,
           "environment": environment()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        res["device_info"] = {"capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2 ** 30, 1),
                              "sms": p.multi_processor_count, "cuda": torch.version.cuda}
    t0 = time.time()
    n = 1024 if smoke else 8192
    peak = {d: matmul_rate(dev, getattr(torch, d), n, 2 if smoke else 20) / 1e12 for d in ("float16", "bfloat16")}
    res["peak_tflops"] = {"matmul_fp16_measured": round(peak["float16"], 1), "matmul_bf16_measured": round(peak["bfloat16"], 1),
                          "vendor_dense_fp16": vendor_peak(name)}
    print(f"device {name}: matmul fp16 {peak['float16']:.1f} TFLOP/s, bf16 {peak['bfloat16']:.1f}", flush=True)

    # 2. throughput of both recipes, with the options beside them
    res["training"] = {}
    variants = [("old", {}), ("new", {}), ("new", {"channels_last": True})] + ([("new", {"compile_": True})] if compile_ else [])
    for role, opt in variants:
        key = role + "".join(f"+{k.rstrip('_')}" for k in opt)
        step = recipe_step(role, sh, dev, cache, **opt)
        s = per_step(step, dev, sh["warmup"] + (5 if opt.get("compile_") else 0), sh["iters"])
        fl = step_flops(step) if not opt.get("compile_") else res["training"]["new"]["flops_per_step"]
        res["training"][key] = {"step_ms": round(1000 * s, 2), "img_s": round(sh["b"] / s, 1), "flops_per_step": fl,
                                "tflops": round(fl / s / 1e12, 2), "utilisation_vs_matmul": round(fl / s / 1e12 / peak["float16"], 3)}
        print(f"train {key:18s} {1000 * s:8.2f} ms/step {sh['b'] / s:9.1f} img/s {fl / s / 1e12:7.2f} TFLOP/s "
              f"({fl / s / 1e12 / peak['float16']:.0%} of the fp16 matmul rate)", flush=True)
        del step
        if dev.type == "cuda": torch.cuda.empty_cache()

    # 5. arcface_torch's step on the same shapes
    ref = arcface_torch_step(sh, dev)
    s = per_step(ref, dev, sh["warmup"], sh["iters"])
    res["arcface_torch_step"] = {"step_ms": round(1000 * s, 2), "img_s": round(sh["b"] / s, 1),
                                 "ours_over_theirs": round(res["training"]["new"]["step_ms"] / (1000 * s), 3)}
    print(f"arcface_torch step (rebuilt) {1000 * s:8.2f} ms/step; ours/theirs {res['arcface_torch_step']['ours_over_theirs']:.3f}", flush=True)
    del ref

    # 3. every method against independent, paired in rounds
    kw = dict(device=dev.type, backbones=("iresnet18", "iresnet50"), size=sh["size"], old_head="arcface",
              head_sm=(64.0, 0.5), clip=5.0)
    ind = build("independent", "cached", sh["n"], sh["c_new"], sh["c_old"], sh["b"], sh["dim"], True, cache, **kw)[0]
    methods = {}
    for m in available_methods():
        if m == "independent": continue
        try:
            step, setup_s, epoch_s, _ = build(m, "cached", sh["n"], sh["c_new"], sh["c_old"], sh["b"], sh["dim"], True, cache, **kw)
        except Exception as e:                                               # a method that cannot run at this shape
            methods[m] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}; print(f"method {m}: {methods[m]['error']}"); continue
        ratios, ts = [], []
        for r in range(sh["rounds"]):
            a = per_step(ind, dev, 1, sh["method_iters"]); t = per_step(step, dev, 1, sh["method_iters"])
            ratios.append(t / a); ts.append(t)
        methods[m] = {"step_ms": round(1000 * statistics.median(ts), 2), "ratio": round(statistics.median(ratios), 3),
                      "setup_s": round(setup_s, 2), "epoch_hook_s": round(epoch_s, 2)}
        print(f"method {m:20s} {methods[m]['step_ms']:8.2f} ms/step  ×{methods[m]['ratio']:.3f} of independent", flush=True)
        del step
        if dev.type == "cuda": torch.cuda.empty_cache()
    res["methods"] = methods

    # 4. input pipeline
    with tempfile.TemporaryDirectory() as wd:
        res["input_pipeline"] = input_pipeline(sh, dev, wd)
    print("input pipeline", res["input_pipeline"], flush=True)
    res["wall_s"] = round(time.time() - t0, 1)
    if not smoke: save_json(OUT, res); print(f"wrote {OUT}")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device, nothing written")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the new backbone")
    a = ap.parse_args()
    main(a.smoke, a.compile)
