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

import torch
from torch.utils.flop_counter import FlopCounterMode

import ddpm

IMAGE = (1, 28, 28)


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


def matmul_ceiling(device, n, repeats):
    """GFLOP/s of an n x n fp32 matmul: what this machine's arithmetic reaches right now."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    timings(lambda: a @ b, device, 2)                                   # warm-up
    return spread([2 * n**3 / s / 1e9 for s in timings(lambda: a @ b, device, repeats)])


def make_model(smoke, device):
    torch.manual_seed(0)
    return (ddpm.UNet(base_channels=8) if smoke else ddpm.UNet()).to(device)


def train_bench(args, device, diffusion, batch, compile_model):
    """Images/s of the whole training step: forward, training_loss, backward, AdamW step."""
    model = make_model(args.smoke, device)
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
        diffusion.training_loss(net, x0).backward()
        optimizer.step()

    reset_peak_memory(device)
    first = timings(step, device, 1)[0]        # includes the compilation when compiling
    timings(step, device, args.warmup - 1)
    seconds = timings(step, device, args.steps)
    flops = counter.get_total_flops()
    return {"batch": batch, "compiled": compile_model, "first_step_s": first,
            "img_per_s": spread([batch / s for s in seconds]),
            "gflop_per_s": flops / statistics.median(seconds) / 1e9,
            "flop_per_image": flops / batch, "peak_mib": peak_memory_mib(device)}


def sampling_bench(args, device, diffusion):
    """Seconds per `n` images for `sample` (all T steps) and `ddim_sample` (50 steps), with the
    UNet and with a model that returns zeros (the samplers' own overhead)."""
    n, model = args.sample_batch, make_model(args.smoke, device).eval()
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
              "cpu": cpu_name(), "params": sum(p.numel() for p in make_model(args.smoke, device)
                                               .parameters())}
    result["ceiling_before"] = matmul_ceiling(device, args.matmul_n, args.matmul_repeats)
    result["train"] = [train_bench(args, device, diffusion, b, c)
                       for c in ([False, True] if args.compile else [False]) for b in args.batches]
    result["ceiling_after"] = matmul_ceiling(device, args.matmul_n, args.matmul_repeats)
    ceiling = (result["ceiling_before"]["median"] + result["ceiling_after"]["median"]) / 2
    for row in result["train"]:
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
    print(f"ddpm bench: {r['device']} ({r['cpu']}, {r['threads']} threads), torch {r['torch']}, "
          f"UNet with {r['params']:,} parameters{'  [SMOKE: tiny sizes]' if args.smoke else ''}")
    print(f"fp32 matmul ceiling, {n}x{n} @ {n}x{n}, GFLOP/s median (min - max):")
    print(f"  before  {mmm(r['ceiling_before'], '6.1f')}\n  after   {mmm(r['ceiling_after'], '6.1f')}")
    flop = r["train"][0]["flop_per_image"]
    print(f"\ntraining step = forward + training_loss + backward + AdamW step, {args.steps} timed "
          f"steps after {args.warmup} warm-up;\n{flop / 1e6:.0f} MFLOP/image "
          "(FlopCounterMode, forward + backward); fraction of the mean of both ceilings")
    print(" batch  compiled  img/s median (min - max)   GFLOP/s  of ceiling  peak MiB  first step s")
    for t in r["train"]:
        print(f"{t['batch']:6d}  {'yes' if t['compiled'] else 'no':>8}  "
              f"{mmm(t['img_per_s'], '6.1f')}  {t['gflop_per_s']:8.1f}  "
              f"{t['fraction_of_ceiling']:10.2f}  {t['peak_mib']:8.0f}  {t['first_step_s']:12.2f}")
    s = r["sampling"]
    print(f"\nsampling {s['images']} images, model.eval(), seconds median (min - max) over "
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
        args.sample_batch, args.prefix, args.ddim_steps, args.sample_repeats = 2, 2, 5, 1
    else:
        args.batches, args.warmup, args.steps, args.matmul_n, args.matmul_repeats = \
            [32, 64, 128], 3, 10, 2048, 10
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
