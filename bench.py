"""How fast is ddpm.py? Training throughput of the default MNIST UNet and the cost of sampling.

    python bench.py                # one table (a few minutes on 2 CPU cores)
    python bench.py --json         # the same numbers, machine-readable
    python bench.py --smoke        # tiny sizes, seconds: checks that the bench runs (CI)
    python bench.py --compile      # also time a torch.compile'd UNet

Machine speed drifts (on shared CPUs by 1.6-1.9x), so every timing is a median with its min and
max, and training speed is also given as a fraction of an fp32 matmul ceiling measured in the
same run, before and after the training runs. Compare those fractions across runs, not img/s.
"""

import argparse
import json
import platform
import resource
import statistics
import time
import warnings

# torch warns at import when NumPy is missing; nothing here needs NumPy.
warnings.filterwarnings("ignore", "Failed to initialize NumPy", UserWarning)

import torch
from torch.utils.flop_counter import FlopCounterMode

import ddpm

IMAGE = (1, 28, 28)
# The U-Nets timed. "reference": ddpm.UNet's defaults, channels (32, 64, 64), 2 residual blocks per
# level, attention at 7x7, GroupNorm(8) -- the size of the diffusers UNet2DModel that the speed
# targets were set against. "default": the model that `python train_mnist.py` trains (its "fast"
# preset). The smoke mode shrinks both.
MODELS = {"reference": {},
          "default": {"base_channels": 16, "channel_mult": (1, 2, 4), "num_res_blocks": 1,
                      "dropout": 0.0}}
SMOKE = {"base_channels": 8, "num_res_blocks": 1}


def pick_device(name):
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def sync(device):
    """Wait for queued GPU work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def timings(fn, device, repeats):
    """Seconds for each of `repeats` calls of fn()."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:                                   # Linux: "5" resets this process's peak RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:                        # elsewhere the peak is the one since start-up
            pass


def peak_memory_mib(device):
    """Peak CUDA memory allocated by tensors, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except OSError:                            # ru_maxrss is in KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def matmul_ceiling(device, n, repeats, dtype):
    """GFLOP/s of an n x n matmul in `dtype`: what this machine's arithmetic reaches right now."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timings(lambda: a @ b, device, 2)                                   # warm-up
    return spread([2 * n**3 / s / 1e9 for s in timings(lambda: a @ b, device, repeats)])


def make_model(name, smoke, device):
    torch.manual_seed(0)
    return ddpm.UNet(**(MODELS[name] | (SMOKE if smoke else {}))).to(device)


def train_bench(args, device, diffusion, name, batch, precision, compile_model):
    """Images/s of the whole training step: forward, training_loss (under bf16 autocast when
    precision is "bf16", as train_mnist.py trains), backward, AdamW step."""
    model = make_model(name, args.smoke, device)
    # FLOPs counted on the eager model: the convolutions, matmuls and attention of forward and
    # backward (elementwise ops and the optimizer are not counted; compiling changes none).
    x0 = torch.rand(batch, *IMAGE, device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        diffusion.training_loss(model, x0).backward()
    model.zero_grad(set_to_none=True)
    net = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion.training_loss(net, x0)
        loss.backward()
        optimizer.step()

    reset_peak_memory(device)
    first = timings(step, device, 1)[0]        # includes the compilation when compiling
    timings(step, device, args.warmup - 1)
    seconds = timings(step, device, args.steps)
    flops = counter.get_total_flops()
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "batch": batch,
            "precision": precision, "compiled": compile_model, "first_step_s": first,
            "img_per_s": spread([batch / s for s in seconds]),
            "gflop_per_s": flops / statistics.median(seconds) / 1e9,
            "flop_per_image": flops / batch, "peak_mib": peak_memory_mib(device)}


def sampling_bench(args, device, diffusion):
    """Seconds per `n` images for `sample` (all T steps) and `ddim_sample` (50 steps), with the
    reference UNet and with a model that returns zeros (the samplers' own overhead)."""
    n, model = args.sample_batch, make_model("reference", args.smoke, device).eval()
    shape, T = (n, *IMAGE), diffusion.T

    def zeros(x_t, t):
        return torch.zeros_like(x_t)

    def ancestral_prefix():
        # `sample` is Algorithm 2: x_T ~ N(0, I), then p_sample for t = T-1 .. 0. Every step costs
        # the same, so time its first `prefix` steps and scale by T / prefix.
        x = torch.randn(shape, device=device)
        for i in reversed(range(T - args.prefix, T)):
            x = diffusion.p_sample(model, x, torch.full((n,), i, device=device))

    def ddim():
        diffusion.ddim_sample(model, shape, steps=args.ddim_steps)

    full, fast = [], []
    for _ in range(args.sample_repeats):       # interleaved, so that drift hits both alike
        full += [s * T / args.prefix for s in timings(ancestral_prefix, device, 1)]
        fast += timings(ddim, device, 1)
    overhead_full = timings(lambda: diffusion.sample(zeros, shape), device, 3)
    overhead_fast = timings(lambda: diffusion.ddim_sample(zeros, shape, args.ddim_steps), device, 3)
    return {"images": n, "T": T, "prefix_steps_timed": args.prefix, "ddim_steps": args.ddim_steps,
            "sample_s": spread(full), "ddim_sample_s": spread(fast),
            "ratio": statistics.median(full) / statistics.median(fast),
            "unet_step_ms": 1e3 * statistics.median(full) / T,
            "overhead_step_ms": {"sample": 1e3 * statistics.median(overhead_full) / T,
                                 "ddim_sample": 1e3 * statistics.median(overhead_fast)
                                 / args.ddim_steps}}


def run(args):
    device = pick_device(args.device)
    diffusion = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(1000)).to(device)
    result = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": cpu_name()}
    precisions = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def ceilings():
        return {p: matmul_ceiling(device, args.matmul_n, args.matmul_repeats, dtype)
                for p, dtype in precisions.items()}

    result["ceiling_before"] = ceilings()
    runs = ([("reference", b, "fp32") for b in args.batches]
            + [("reference", args.batches[-1], "bf16")]
            + [("default", args.default_batch, p) for p in precisions])
    result["train"] = [train_bench(args, device, diffusion, name, b, p, c)
                       for c in ([False, True] if args.compile else [False]) for name, b, p in runs]
    result["ceiling_after"] = ceilings()
    for row in result["train"]:      # against the matmul of the same precision, before and after
        p = row["precision"]
        ceiling = (result["ceiling_before"][p]["median"] + result["ceiling_after"][p]["median"]) / 2
        row["fraction_of_ceiling"] = row["gflop_per_s"] / ceiling
    result["sampling"] = sampling_bench(args, device, diffusion)
    return result


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def print_table(r, args):
    def mmm(d, fmt):
        return f"{d['median']:{fmt}}  ({d['min']:{fmt}} - {d['max']:{fmt}})"

    n = args.matmul_n
    print(f"ddpm bench: {r['device']} ({r['cpu']}, {r['threads']} threads), torch {r['torch']}"
          f"{'  [SMOKE: tiny sizes]' if args.smoke else ''}")
    print(f"matmul ceiling, {n}x{n} @ {n}x{n}, GFLOP/s median (min - max):")
    for p in r["ceiling_before"]:
        print(f"  {p}  before  {mmm(r['ceiling_before'][p], '6.1f')}   after  "
              f"{mmm(r['ceiling_after'][p], '6.1f')}")
    print(f"\ntraining step = forward + training_loss + backward + AdamW step, {args.steps} timed "
          f"steps after {args.warmup} warm-up;\nMFLOP/image by FlopCounterMode (forward + "
          "backward); GFLOP/s as a fraction of the mean of both ceilings of its precision "
          "(bf16: autocast).\nreference: "
          "ddpm.UNet(), channels (32, 64, 64); default: the model `python train_mnist.py` trains, "
          "(16, 32, 64), 1 residual block per level")
    print("model      params  MFLOP/img  batch  precision  compiled  img/s median (min - max)   "
          "GFLOP/s  of ceiling  peak MiB  first step s")
    for t in r["train"]:
        print(f"{t['model']:9s} {t['params'] / 1e6:6.2f}M  {t['flop_per_image'] / 1e6:9.0f}  "
              f"{t['batch']:5d}  {t['precision']:>9}  {'yes' if t['compiled'] else 'no':>8}  "
              f"{mmm(t['img_per_s'], '6.1f')}  {t['gflop_per_s']:8.1f}  "
              f"{t['fraction_of_ceiling']:10.2f}  {t['peak_mib']:8.0f}  {t['first_step_s']:12.2f}")
    s = r["sampling"]
    print(f"\nsampling {s['images']} images with the reference UNet in eval mode, seconds median "
          "(min - max) over "
          f"{args.sample_repeats} interleaved runs:")
    print(f"  sample, {s['T']} steps   {mmm(s['sample_s'], '8.2f')}   extrapolated: "
          f"first {s['prefix_steps_timed']} steps timed, x {s['T'] / s['prefix_steps_timed']:g}")
    print(f"  ddim_sample, {s['ddim_steps']} steps  {mmm(s['ddim_sample_s'], '8.2f')}")
    print(f"  sample / ddim_sample  {s['ratio']:.1f}x   (ideal {s['T'] / s['ddim_steps']:g}x)")
    o = s["overhead_step_ms"]
    print(f"  per step: UNet {s['unet_step_ms']:.1f} ms; sampler overhead (model returning zeros) "
          f"sample {o['sample']:.3f} ms, ddim_sample {o['ddim_sample']:.3f} ms")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that it runs")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    args = p.parse_args()
    if args.smoke:
        args.batches, args.warmup, args.steps, args.matmul_n, args.matmul_repeats = [2, 4], 1, 2, 64, 3
        args.default_batch = 2
        args.sample_batch, args.prefix, args.ddim_steps, args.sample_repeats = 2, 2, 5, 1
    else:
        args.batches, args.warmup, args.steps, args.matmul_n, args.matmul_repeats = \
            [32, 64, 128], 3, 10, 2048, 10
        args.default_batch = 32
        args.sample_batch, args.prefix, args.ddim_steps, args.sample_repeats = 64, 50, 50, 3
    if args.device != "auto" and not {"cuda": torch.cuda.is_available,
                                      "mps": torch.backends.mps.is_available,
                                      "cpu": lambda: True}[args.device]():
        p.error(f"--device {args.device} is not available here")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result, args)


if __name__ == "__main__":
    main()
