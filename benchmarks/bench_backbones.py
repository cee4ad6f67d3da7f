"""Training throughput of every registered backbone on CPU: images/s for forward + backward at the backbone's native input
size (cpu_resnet 32, iResNet 112, ResNet-GeM 224), in fp32 and under bf16 autocast (the trainer's CPU precision).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_backbones.py            # one thread (the CPU tier's setting)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_backbones.py --quick    # cpu_resnet + iresnet18 only

Writes benchmarks/results/backbones.json with the machine description (bctnb.runs.environment()). The big backbones
run only a couple of iterations: their numbers are rough (±10 %), good for sizing runs, not for comparing kernels.
"""
import argparse, json, os, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

from bctnb.core import save_json, select_precision
from bctnb.runs import environment
from bctnb.models import BACKBONES, create_backbone, num_params

# name -> (batch size, timed iterations); one untimed warm-up iteration precedes the timed ones
PLAN = {"cpu_resnet": (128, 10), "iresnet18": (16, 3), "iresnet50": (8, 2), "iresnet100": (4, 2),
        "resnet50_gem": (8, 2), "resnet101_gem": (4, 2)}


def bench(name: str, batch: int, iters: int, amp: bool, dim: int | None = None) -> dict:
    torch.manual_seed(0)
    m = create_backbone(name, dim=dim or (128 if name == "cpu_resnet" else 512)).train()
    size = m.input_size
    x = torch.randn(batch, 3, size, size)
    prec = select_precision("cpu", amp=amp)
    times = []
    for i in range(iters + 1):
        t = time.perf_counter()
        with prec.autocast():
            f = m(x)
        loss = f.float().pow(2).mean()
        m.zero_grad(set_to_none=True)
        loss.backward()
        if i: times.append(time.perf_counter() - t)
    sec = sum(times) / len(times)
    return {"img_s": batch / sec, "sec_per_iter": sec, "batch": batch, "iters": iters, "input_size": size, "dim": m.dim,
            "params_M": num_params(m) / 1e6}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only cpu_resnet and iresnet18")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "backbones.json"))
    a = ap.parse_args(argv)
    names = [n for n in BACKBONES.names() if not a.quick or n in ("cpu_resnet", "iresnet18")]
    rows = []
    print(f"threads={torch.get_num_threads()}  (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    print(f"{'backbone':15s} {'size':>4s} {'params':>7s} {'batch':>5s} {'fp32 img/s':>11s} {'bf16 img/s':>11s}")
    for n in names:
        batch, iters = PLAN.get(n, (4, 2))
        r32 = bench(n, batch, iters, amp=False)
        r16 = bench(n, batch, iters, amp=True)
        rows.append({"backbone": n, "input_size": r32["input_size"], "dim": r32["dim"], "params_M": round(r32["params_M"], 3),
                     "batch": batch, "iters": iters, "fp32_img_s": round(r32["img_s"], 2), "bf16_img_s": round(r16["img_s"], 2)})
        print(f"{n:15s} {r32['input_size']:4d} {r32['params_M']:6.2f}M {batch:5d} {r32['img_s']:11.1f} {r16['img_s']:11.1f}", flush=True)
    out = {"benchmark": "backbones", "what": "forward+backward images/s at native input size, CPU, training mode",
           "threads": torch.get_num_threads(), "results": rows, "environment": environment()}
    save_json(a.out, out)
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
