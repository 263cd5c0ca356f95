"""Train the DDPM of ddpm.py on MNIST (or Fashion-MNIST), draw samples and judge them.

    python train_mnist.py                 # download MNIST, train, write pictures to runs/mnist
    python train_mnist.py --resume        # continue runs/mnist from its checkpoint
    python train_mnist.py --sample-only   # a grid of samples from runs/mnist/checkpoint.pt
    python train_mnist.py --eval          # judge samples and measure bits/dim of that checkpoint

The run folder (--out) gets args.json, metrics.jsonl (one JSON line per log point, then a "judge"
line at the end of an MNIST run and an "eval" line per --eval), checkpoint.pt,
samples_stepN.png / samples.png (8x8 grids of samples from the EMA weights), chain.png (a few
samples at ~10 points of the reverse process, from pure noise to the final digit) and judge.pt
(the digit classifier that judges samples).

Sections: the recipe, data, pictures, checkpoints, training, sampling from a checkpoint, judging
samples, the command line. Standard library and torch only.
"""

import argparse
import copy
import gzip
import hashlib
import http.client
import itertools
import json
import math
import os
import signal
import struct
import sys
import time
import urllib.error
import urllib.request
import warnings
import zlib

# torch warns at import when NumPy is missing; nothing here needs NumPy.
warnings.filterwarnings("ignore", "Failed to initialize NumPy", UserWarning)

import torch

import ddpm

# ---------------------------------------------------------------------------------------------
# The recipe: every default of the training run, in one place
# ---------------------------------------------------------------------------------------------

# "fast" is the default: recognisable digits in about 15 minutes on 2 CPU cores. "paper" is the
# training recipe of [Ho] sec. 4 and appendix B (their CIFAR-10 settings: Adam at 2e-4 with a
# 5000-step warm-up, batch 128, dropout 0.1, EMA 0.9999, 800k steps, ancestral sampling) on the
# MNIST U-Net widened to 128 channels, for GPUs. Any flag given explicitly overrides its preset.
PRESETS = {
    "fast": {"channels": 16, "channel_mult": "1,2,4", "res_blocks": 1, "dropout": 0.0,
             "T": 1000, "schedule": "cosine", "prediction": "eps",
             "steps": 7000, "batch_size": 32, "lr": 1.5e-3, "lr_schedule": "cosine",
             "warmup": 200, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.995,
             "sampler": "ddim", "eta": 1.0, "sample_every": 1750, "ckpt_every": 500},
    "paper": {"channels": 128, "channel_mult": "1,2,2", "res_blocks": 2, "dropout": 0.1,
              "T": 1000, "schedule": "linear", "prediction": "eps",
              "steps": 800_000, "batch_size": 128, "lr": 2e-4, "lr_schedule": "constant",
              "warmup": 5000, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.9999,
              "sampler": "ddpm", "eta": 1.0, "sample_every": 10_000, "ckpt_every": 5000},
}
# The arguments that shape the model and the diffusion: a checkpoint resumes only if they match.
MODEL_CONFIG = ("dataset", "channels", "channel_mult", "res_blocks", "dropout", "T", "schedule",
                "prediction")
# The arguments of one invocation, never taken from a checkpoint by --resume.
INVOCATION = ("resume", "sample_only", "eval", "ckpt", "out")
LOG_INTERVAL = 0.5          # seconds between log points (a metrics.jsonl line, a progress update)


class UserError(Exception):
    """Something the user can fix (a path, a file, a flag): reported in one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# Data: the four IDX files, downloaded if missing, validated on load
# ---------------------------------------------------------------------------------------------

# (images file, labels file, number of items) per split; Fashion-MNIST uses the same names.
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}
# The published MD5s of the .gz files, checked on download. Files already on disk are checked
# structurally instead (read_idx): a recompressed copy of the same data is just as good.
MD5 = {
    "mnist": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    "fashion": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
}
# Tried in order; the file name is appended. The environment variable MNIST_MIRRORS (base
# addresses separated by spaces) replaces them, e.g. for a local mirror or the tests.
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/",
              "http://yann.lecun.com/exdb/mnist/"],
    "fashion": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
}
NAMES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}


def download(filename, md5, folder, mirrors, status):
    """Fetch `filename` from the first mirror that serves it with the published MD5. The bytes go
    to a temporary file in `folder` that is renamed into place only once verified, so a failed
    download never leaves a half-written file behind."""
    path, failures = os.path.join(folder, filename), []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        tmp = f"{path}.part"        # a fixed name: a killed download's leftover is overwritten
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0)
                done, digest = 0, hashlib.md5()
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    status.update(f"downloading {url}: {done / 1e6:.1f}"
                                  + (f" of {total / 1e6:.1f} MB" if total else " MB"))
            if digest.hexdigest() != md5:
                raise ValueError(f"MD5 {digest.hexdigest()} is not the published {md5}")
            os.replace(tmp, path)
            status.print(f"downloaded {url} ({done / 1e6:.1f} MB, MD5 ok)")
            return path
        # URLError, HTTPError and timeouts are OSErrors; a connection lost mid-file raises
        # IncompleteRead, an HTTPException.
        except (OSError, ValueError, http.client.HTTPException) as e:
            failures.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    files = ", ".join(MD5["mnist"])
    raise UserError(f"could not download {filename} (offline?). Tried:\n  " + "\n  ".join(failures)
                    + f"\nDownload the four files ({files}) by hand and put them in {folder}, or "
                    "point --data-dir at a folder that holds them.")


def read_idx(path, shape):
    """Read a gzip-compressed IDX file of unsigned bytes -- big-endian int32 magic 0x0800 + number
    of dimensions, one big-endian int32 per dimension, then the row-major payload -- and check
    that it holds exactly `shape`. Returns a uint8 tensor of that shape."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, or a bad CRC
        raise UserError(f"{path} is not an intact gzip file ({e}); delete it to download it "
                        "again") from None
    header = 4 * (1 + len(shape))
    if len(data) < header:
        raise UserError(f"{path} is too short for an IDX header ({len(data)} bytes)")
    magic, *dims = struct.unpack(f">{1 + len(shape)}I", data[:header])
    if magic != 0x800 + len(shape):
        raise UserError(f"{path} has IDX magic 0x{magic:08x}, expected 0x{0x800 + len(shape):08x} "
                        f"({'images' if len(shape) == 3 else 'labels'} of unsigned bytes)")
    if tuple(dims) != shape:
        raise UserError(f"{path} has dimensions {tuple(dims)}, expected {shape}")
    if len(data) - header != math.prod(shape):
        raise UserError(f"{path} holds {len(data) - header} bytes of data, expected "
                        f"{math.prod(shape)} (truncated?)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(shape)


def load_split(folder, dataset, split, status):
    """Images uint8 (N, 28, 28) and labels int64 (N,) of one split, downloading missing files."""
    missing = [name for name in MD5[dataset] if not os.path.exists(os.path.join(folder, name))]
    if missing:
        os.makedirs(folder, exist_ok=True)
        mirrors = os.environ.get("MNIST_MIRRORS", "").split() or MIRRORS[dataset]
        for name in missing:
            download(name, MD5[dataset][name], folder, mirrors, status)
    images_file, labels_file, n = SPLITS[split]
    images = read_idx(os.path.join(folder, images_file), (n, 28, 28))
    labels = read_idx(os.path.join(folder, labels_file), (n,))
    if int(labels.max()) > 9:
        raise UserError(f"{os.path.join(folder, labels_file)} has a label {int(labels.max())}; "
                        "labels must be 0-9")
    return images, labels.long()


def batches(n, batch_size, seed, start, device):
    """The index tensors (on `device`) of the minibatches of steps start, start + 1, ...: epoch e
    is the (e+1)-th permutation drawn from a generator seeded with `seed`, cut into
    n // batch_size batches (the partial last one dropped). The order depends on the seed alone,
    so a resumed run replays the draws of the earlier epochs and sees exactly the batches of an
    unbroken one."""
    generator, per_epoch = torch.Generator().manual_seed(seed), n // batch_size
    for epoch in itertools.count():
        order = torch.randperm(n, generator=generator)
        if (epoch + 1) * per_epoch <= start:
            continue
        order = order.to(device)            # once per epoch: slicing it below needs no host sync
        for i in range(max(0, start - epoch * per_epoch), per_epoch):
            yield order[i * batch_size:(i + 1) * batch_size]


def to_unit_range(images):
    """uint8 0..255 -> exactly the 256 bin centres k/127.5 - 1 on [-1, 1] that the discretized
    decoder of [Ho] eq. 13 assumes."""
    return images.float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# Pictures: 8-bit grayscale PNG written with zlib
# ---------------------------------------------------------------------------------------------


def to_uint8(x):
    """[-1, 1] -> 0..255, rounding to the nearest level (the inverse of to_unit_range)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def tile(images, ncol, pad=2, scale=2):
    """(N, 1, H, W) values on [-1, 1] -> one uint8 picture with the images in rows of ncol, on a
    grey background, magnified `scale` times."""
    n, _, h, w = images.shape
    nrow = -(-n // ncol)
    canvas = torch.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad), 128, dtype=torch.uint8)
    for i, image in enumerate(to_uint8(images.cpu())):
        y, x = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        canvas[y:y + h, x:x + w] = image[0]
    return canvas.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def png_bytes(pixels):
    """PNG file contents for a uint8 (H, W) picture: 8-bit grayscale, one zlib stream."""
    def chunk(kind, data):
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    h, w = pixels.shape
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), pixels], dim=1)  # filter 0 per row
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(rows.flatten().tolist()), 9))
            + chunk(b"IEND", b""))


def save_png(path, pixels):
    atomic_write(path, lambda f: f.write(png_bytes(pixels)))


def draw(diffusion, model, n, sampler, steps, eta, seed, chain):
    """n samples (n, 1, 28, 28) from `model` (put in eval mode by the caller), or with chain all
    the states of the reverse process, (steps + 1, n, 1, 28, 28); eta is DDIM's. The noise comes
    from its own generator seeded with `seed`: grids at different steps of a run start from the
    same x_T, and training's random stream is left untouched."""
    device = diffusion.betas.device
    generator = torch.Generator(device).manual_seed(seed)
    shape = (n, 1, 28, 28)
    if sampler == "ddpm":
        return diffusion.sample(model, shape, generator=generator, return_chain=chain)
    return diffusion.ddim_sample(model, shape, steps=steps, eta=eta, generator=generator,
                                 return_chain=chain)


def sampler_name(sampler, steps, eta):
    return f"ddim-{steps} (eta {eta:g})" if sampler == "ddim" else f"ddpm-{steps}"


def sample_steps(sampler, steps, T):
    """The number of sampling steps: DDPM (Algorithm 2) takes all T; DDIM takes --sample-steps."""
    if sampler == "ddpm":
        if steps not in (None, T):
            raise UserError(f"the ddpm sampler takes all T={T} steps; --sample-steps is for "
                            "--sampler ddim")
        return T
    steps = min(50, T) if steps is None else steps
    if steps > T:
        raise UserError(f"--sample-steps {steps} exceeds the model's T={T}")
    return steps


def save_pictures(folder, step, chain):
    """samples_step{step}.png and samples.png: the final states as an 8x8 grid (for n = 64);
    chain.png: the first 8 samples (rows) at 10 evenly spaced points from x_T to x_0 (columns)."""
    grid = tile(chain[-1], ncol=math.ceil(math.sqrt(chain.shape[1])))
    save_png(os.path.join(folder, f"samples_step{step:06d}.png"), grid)
    save_png(os.path.join(folder, "samples.png"), grid)
    points = torch.linspace(0, len(chain) - 1, min(10, len(chain))).round().long()
    rows = chain[points, :8].transpose(0, 1)                 # (rows, points, 1, 28, 28)
    save_png(os.path.join(folder, "chain.png"), tile(rows.flatten(0, 1), ncol=len(points)))


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, safe loads, and the model they describe
# ---------------------------------------------------------------------------------------------


def atomic_write(path, write):
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over
    `path`: a crash at any moment leaves either the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp"       # a fixed name: the next write replaces a killed one's leftover
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_model(config):
    """The U-Net of ddpm.py, with self-attention at its coarsest level (7x7 for three levels)."""
    channel_mult = tuple(int(m) for m in config["channel_mult"].split(","))
    return ddpm.UNet(base_channels=config["channels"], channel_mult=channel_mult,
                     num_res_blocks=config["res_blocks"],
                     attn_resolutions=(28 // 2 ** (len(channel_mult) - 1),),
                     dropout=config["dropout"])


def make_diffusion(config):
    schedule = {"linear": ddpm.linear_beta_schedule, "cosine": ddpm.cosine_beta_schedule}
    return ddpm.GaussianDiffusion(schedule[config["schedule"]](config["T"]),
                                  prediction=config["prediction"])


def load_checkpoint(path):
    """The checkpoint dict at `path`, read without running any code from it (weights_only)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torn, truncated or foreign files fail in many ways
        reason = (str(e).splitlines() or [""])[0]
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                        f"{reason})") from None
    if not (isinstance(ckpt, dict)
            and {"step", "elapsed", "args", "rng", "model", "ema", "optimizer"} <= ckpt.keys()):
        raise UserError(f"{path} is not a checkpoint written by train_mnist.py")
    missing = [k for k in MODEL_CONFIG if k not in ckpt["args"]]
    if missing:
        raise UserError(f"{path} was written by an older train_mnist.py (its arguments lack "
                        f"{', '.join(missing)}); train a new run")
    return ckpt


def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit this version of the model: "
                        f"{str(e).splitlines()[0]}") from None


def load_ema(path, device):
    """The EMA model (in eval mode), the diffusion, the arguments of a checkpoint's run and the
    step it was saved at."""
    ckpt = load_checkpoint(path)
    model = make_model(ckpt["args"])
    load_weights(model, ckpt["ema"], path)
    return (model.to(device).eval(), make_diffusion(ckpt["args"]).to(device), ckpt["args"],
            ckpt["step"])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class Status:
    """The progress line: rewritten in place on a terminal (at most 4 times a second), printed as
    plain lines at most every 30 s when stdout is a pipe or a log file."""

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.interval, self.last, self.open = (0.25 if self.tty else 30.0), -math.inf, False

    def update(self, text, force=False):
        now = time.monotonic()
        if force or now - self.last >= self.interval:
            self.last = now
            if self.tty:
                sys.stdout.write("\r" + text + "\033[K")     # \033[K clears the rest of the line
                sys.stdout.flush()
                self.open = True
            else:
                print(text, flush=True)

    def print(self, text):
        """A line that stays, below the progress line."""
        if self.open:
            sys.stdout.write("\n")
            self.open = False
        print(text, flush=True)


class StopRequest:
    """Within `with`: the first Ctrl-C (SIGINT) or SIGTERM sets `signum`, and training saves a
    checkpoint and stops after the current step; a second one interrupts at once, and so does the
    first while a sample grid is being drawn (`drawing`), as its step is saved by then."""

    def __init__(self, status):
        self.status, self.signum, self.drawing = status, None, False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.signum = signum
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        name = signal.Signals(signum).name
        if self.drawing:                 # the checkpoint of this step was saved before drawing
            self.status.print(f"{name} while drawing samples: the checkpoint of this step is "
                              "saved; stopping now. Run the same command with --resume to "
                              "continue.")
            raise KeyboardInterrupt
        self.status.print(f"{name}: saving a checkpoint after this step "
                          "(press Ctrl-C again to quit at once)")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def pick_device(name):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next((d for d in ("cuda", "mps") if available[d]), "cpu"))
    if name != "cpu" and not available[name]:
        raise UserError(f"--device {name} is not available on this machine")
    return torch.device(name)


def use_bf16(precision, device):
    """--precision auto: bf16 autocast for training on CUDA, and on CPUs with native bf16
    arithmetic (AVX512-BF16 or AMX), where it trains 1.2-1.8x faster (bench.py); fp32 elsewhere,
    where bf16 would be emulated and slow. Sampling always runs in fp32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    cpu = torch.cpu        # these probes are private to torch, so ask for them with a default
    native = [getattr(cpu, name, lambda: False) for name in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return device.type == "cpu" and any(probe() for probe in native)


@torch.no_grad()
def update_ema(ema, model, step, decay):
    """ema <- d ema + (1 - d) model with d = min(decay, (1 + step) / (10 + step)): the warm-up
    forgets the random initial weights quickly, so that short runs sample well too."""
    d = min(decay, (1 + step) / (10 + step))
    for average, current in zip(ema.parameters(), model.parameters()):
        average.lerp_(current, 1 - d)


def learning_rate(args, step):
    """The learning rate of the step after `step` steps: a linear warm-up over --warmup steps,
    then --lr, held constant ([Ho]) or decayed along a half cosine to 0 at --steps."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
    if args.lr_schedule == "cosine":
        lr *= (1 + math.cos(math.pi * step / args.steps)) / 2
    return lr


def matmul_gflops(device, n=1024, repeats=9):
    """The speed of an n x n fp32 matmul on `device` right now, in GFLOP/s (median of `repeats`):
    shared machines swing by 1.5x or more, so a run's time means little without it."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        (a @ b)[0, 0].item()                            # .item() waits for an accelerator
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(seconds)[repeats // 2] / 1e9


def format_time(seconds):
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def resumed_args(args, given, saved, status, ckpt_path):
    """--resume: the settings of the run from its checkpoint's arguments, except the flags given
    on this command line (`given`), which are announced where they change a setting. A change
    of the model configuration is refused."""
    changed = {f"--{k.replace('_', '-')}": (saved[k], v) for k, v in vars(args).items()
               if k in given and k in saved and k not in INVOCATION and saved[k] != v}
    model = [f"--{k.replace('_', '-')}" for k in MODEL_CONFIG]
    if refused := [f"{f} {old} (now {new})" for f, (old, new) in changed.items() if f in model]:
        raise UserError(f"{ckpt_path} was made with a different model configuration: "
                        + ", ".join(refused) + "; pass the values it was made with")
    if changed:
        status.print("resuming with changed settings: "
                     + ", ".join(f"{f} {old} -> {new}" for f, (old, new) in changed.items()))
    kept = {k: v for k, v in saved.items() if k not in given and k not in INVOCATION}
    return argparse.Namespace(**(vars(args) | kept))


def truncate_metrics(path, step):
    """Drop the lines of metrics.jsonl past `step`: a run killed after its last checkpoint logged
    steps that the resumed run will log again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    # A log point is {"step": ...}; a verdict is {"judge": {"step": ...}} or {"eval": {...}}.
    kept = [r for r in records if (r if "step" in r else next(iter(r.values())))["step"] <= step]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))


def train(args, given=()):
    session_start, status = time.perf_counter(), Status()
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        args = resumed_args(args, given, ckpt["args"], status, ckpt_path)
    elif os.path.exists(ckpt_path):
        raise UserError(f"{args.out} already holds a run; pass --resume to continue it, or "
                        "choose another --out")
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file, not a folder")
    device = pick_device(args.device)
    steps_per_grid = sample_steps(args.sampler, args.sample_steps, args.T)
    config = vars(args)
    images, _ = load_split(args.data_dir, args.dataset, "train", status)
    if args.batch_size > len(images):
        raise UserError(f"--batch-size {args.batch_size} exceeds the {len(images)} images")
    images = images[:, None].to(device)                       # (N, 1, 28, 28) uint8

    torch.manual_seed(args.seed)
    model = make_model(config).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = make_diffusion(config).to(device)
    cuda = device.type == "cuda"
    bf16 = use_bf16(args.precision, device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=cuda)
    step, elapsed = 0, 0.0
    if args.resume:
        load_weights(model, ckpt["model"], ckpt_path)
        load_weights(ema, ckpt["ema"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:       # the state holds the old run's setting
            group["weight_decay"] = args.weight_decay
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if cuda and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        if step >= args.steps:
            status.print(f"{ckpt_path} is at step {step} >= --steps {args.steps}: nothing to do")
            return 0
        truncate_metrics(os.path.join(args.out, "metrics.jsonl"), step)
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "args.json"),
                 lambda f: f.write(json.dumps(config, indent=2).encode()))

    def wall_time():
        """Seconds since the run began, over all its sessions, loading and sampling included."""
        return elapsed + time.perf_counter() - session_start

    def save():
        rng = {"cpu": torch.get_rng_state()}
        if cuda:
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {"step": step, "elapsed": wall_time(), "args": config, "rng": rng,
                 "model": model.state_dict(), "ema": ema.state_dict(),
                 "optimizer": optimizer.state_dict()}
        atomic_write(ckpt_path, lambda f: torch.save(state, f))

    B, n_params = args.batch_size, sum(p.numel() for p in model.parameters())
    status.print(f"{NAMES[args.dataset]}: {len(images)} images from {args.data_dir} | U-Net "
                 f"{n_params / 1e6:.2f}M parameters | {device} | steps {step}..{args.steps} of "
                 f"batch {B} | {'bf16 autocast' if bf16 else 'fp32'} | grids: "
                 f"{sampler_name(args.sampler, steps_per_grid, args.eta)} | run folder {args.out}")
    data = batches(len(images), B, args.seed, step, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    window_loss, window_steps = torch.zeros((), device=device), 0
    train_time, start_step, window_start = 0.0, step, time.perf_counter()
    model.train()
    with (open(os.path.join(args.out, "metrics.jsonl"), "a" if args.resume else "w") as log,
          StopRequest(status) as stop):
        while step < args.steps:
            x0 = to_unit_range(images[next(data)])              # (B, 1, 28, 28) on [-1, 1]
            lr = learning_rate(args, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                loss = diffusion.training_loss(model, x0)          # Algorithm 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            update_ema(ema, model, step, args.ema_decay)
            step += 1
            window_loss += loss.detach()
            window_steps += 1

            final = step == args.steps
            grid = final or step % args.sample_every == 0
            checkpoint = grid or step % args.ckpt_every == 0 or stop.signum is not None
            now = time.perf_counter()
            if not (checkpoint or grid or now - window_start >= LOG_INTERVAL):
                continue
            # A log point. Reading the loss and checking the weights are the loop's only host
            # syncs: at most twice a second. A non-finite update leaves non-finite weights even
            # when the losses before it were finite, so both are checked before anything is saved.
            mean_loss = (window_loss / window_steps).item()
            finite = torch.stack([p.isfinite().all() for p in model.parameters()]).all().item()
            if not (math.isfinite(mean_loss) and finite):
                kept = (f"the last good checkpoint, {ckpt_path}, is kept"
                        if os.path.exists(ckpt_path) else "no checkpoint was written")
                what = f"the loss became {mean_loss}" if finite else "the weights became non-finite"
                raise UserError(f"{what} between steps {step - window_steps + 1} and {step}; "
                                f"stopped without saving ({kept}). Try a smaller --lr.")
            train_time += now - window_start
            rate = window_steps * B / (now - window_start)
            log.write(json.dumps({"step": step, "loss": mean_loss, "lr": lr, "images_per_s": rate,
                                  "time": wall_time()}) + "\n")
            log.flush()
            eta = (args.steps - step) * train_time / (step - start_step)
            status.update(f"step {step}/{args.steps} | loss {mean_loss:.4f} | {rate:.1f} img/s | "
                          f"lr {lr:.1e} | {format_time(wall_time())} elapsed, "
                          f"{format_time(eta)} left", force=final)
            window_loss.zero_()
            window_steps = 0
            if checkpoint:
                save()
            if stop.signum is not None:
                status.print(f"stopped at step {step}; checkpoint saved to {ckpt_path}. Run the "
                             "same command with --resume to continue.")
                return 128 + stop.signum
            if grid:                        # a Ctrl-C now stops at once: this step is saved
                stop.drawing = True
                chain = draw(diffusion, ema, args.n, args.sampler, steps_per_grid, args.eta,
                             args.seed, chain=True)
                stop.drawing = False
                save_pictures(args.out, step, chain)
            window_start = time.perf_counter()      # sampling and saving are not training time
    gflops = matmul_gflops(device)
    status.print(f"done: step {step} after {format_time(wall_time())} "
                 f"({(step - start_step) * B / train_time:.1f} img/s while training; this "
                 f"machine's fp32 matmul runs at {gflops:.0f} GFLOP/s now). Samples: "
                 f"{os.path.join(args.out, 'samples.png')}, reverse chain: "
                 f"{os.path.join(args.out, 'chain.png')}, checkpoint: {ckpt_path}")
    if args.judge_n and args.dataset != "mnist":
        status.print(SKIP_JUDGE)
    elif args.judge_n:        # fresh samples: the grids start from the noise of args.seed
        result = judge_samples(diffusion, ema, args.judge_n, args.sampler, steps_per_grid,
                               args.eta, args.seed + 1, args.out, args.data_dir, status)
        append_metrics(args.out, {"judge": result | {"step": step, "sampler": args.sampler,
                                                     "sample_steps": steps_per_grid,
                                                     "eta": args.eta, "time": wall_time(),
                                                     "matmul_gflops": gflops}})
        status.print(f"judge: {describe(result)} | "
                     f"{sampler_name(args.sampler, steps_per_grid, args.eta)}, "
                     f"{result['seconds']:.0f} s; the run took {format_time(wall_time())} in all")
    return 0


# ---------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ---------------------------------------------------------------------------------------------


def sample_only(args):
    path = args.ckpt or os.path.join(args.out, "checkpoint.pt")
    model, diffusion, config, _ = load_ema(path, pick_device(args.device))
    steps = sample_steps(args.sampler, args.sample_steps, config["T"])
    x0 = draw(diffusion, model, args.n, args.sampler, steps, args.eta, args.seed, chain=False)
    eta = f"_eta{args.eta:g}" if args.sampler == "ddim" else ""
    png = os.path.join(os.path.dirname(path),
                       f"sample_{args.sampler}{steps}{eta}_seed{args.seed}.png")
    save_png(png, tile(x0, ncol=math.ceil(math.sqrt(args.n))))
    print(f"wrote {args.n} samples ({sampler_name(args.sampler, steps, args.eta)}) to {png}")
    return 0


# ---------------------------------------------------------------------------------------------
# Judging samples: a digit classifier, the Frechet distance of its features, bits/dim
# ---------------------------------------------------------------------------------------------

# The judge is a small CNN trained on MNIST's training set (always MNIST: Fashion-MNIST runs skip
# it), cached as judge.pt in the run folder. Its 64 penultimate features stand in for the
# Inception features of the FID [Heusel et al. 2017, "GANs trained by a two time-scale update
# rule converge to a local Nash equilibrium", eq. 6]: its numbers compare samples of this project
# with each other, never with published FIDs. 1400 steps of batch 128 are 3 epochs.
JUDGE_RECIPE = {"seed": 0, "steps": 1400, "batch_size": 128, "lr": 3e-3}
CONFIDENT = 0.9     # a sample counts as a confident digit when one class gets >= 90%
# The default --n of --eval. Real-vs-real FIDs of 8 random pairs of test sets spread as
# 20.6 +- 6.2 at N = 256, 9.6 +- 1.6 at 500 and 5.9 +- 0.9 at 1000: 500 halves the noise of 256, and
# its DDIM-50 samples take about 4 minutes on one CPU core with the "fast" model.
EVAL_N = 500


class Judge(torch.nn.Module):
    """Two strided 5x5 convolutions (28 -> 14 -> 7 pixels; 16 then 32 channels, batch norm, ReLU),
    a 64-unit layer whose output is the feature vector, and a linear map to the 10 logits."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU())
        self.classify = nn.Linear(64, 10)

    def forward(self, x):                          # x: (B, 1, 28, 28) on [-1, 1] -> (B, 10)
        return self.classify(self.features(x))


def new_judge():
    """A Judge with the initial weights of JUDGE_RECIPE's seed; the caller's random stream is left
    as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(JUDGE_RECIPE["seed"])
        return Judge()


@torch.no_grad()
def judge_outputs(judge, x, chunk=1000):
    """The features (N, 64), float64 on the CPU, and the class probabilities (N, 10) that the judge
    (in eval mode) gives images x (N, 1, 28, 28) on [-1, 1]."""
    device = next(judge.parameters()).device
    features = torch.cat([judge.features(part.to(device)) for part in x.split(chunk)])
    return features.double().cpu(), judge.classify(features).softmax(1).cpu()


def train_judge(data_dir, device, status):
    """A Judge trained with Adam by JUDGE_RECIPE (the learning rate decaying to 0 on a half cosine)
    on MNIST's training images, and its accuracy on the test images."""
    images, labels = load_split(data_dir, "mnist", "train", status)
    test_images, test_labels = load_split(data_dir, "mnist", "test", status)
    recipe = JUDGE_RECIPE
    judge = new_judge().to(device).train()
    images, labels = images[:, None].to(device), labels.to(device)
    optimizer = torch.optim.Adam(judge.parameters(), lr=recipe["lr"])
    data = batches(len(images), recipe["batch_size"], recipe["seed"], 0, device)
    for step, index in zip(range(recipe["steps"]), data):
        for group in optimizer.param_groups:
            group["lr"] = recipe["lr"] * (1 + math.cos(math.pi * step / recipe["steps"])) / 2
        logits = judge(to_unit_range(images[index]))
        loss = torch.nn.functional.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        status.update(f"training the judge: step {step + 1}/{recipe['steps']}")
    judge.eval()
    _, probabilities = judge_outputs(judge, to_unit_range(test_images[:, None]))
    return judge, (probabilities.argmax(1) == test_labels).double().mean().item()


def load_judge(folder, data_dir, device, status):
    """The judge cached as folder/judge.pt (in eval mode) and its test accuracy; when that file is
    missing or unreadable, a judge trained on the MNIST in data_dir, then cached there."""
    path = os.path.join(folder, "judge.pt")
    if os.path.exists(path):
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            judge = new_judge()
            judge.load_state_dict(cached["weights"])
            return judge.to(device).eval(), float(cached["test_accuracy"])
        except Exception as e:  # noqa: BLE001 -- as in load_checkpoint
            status.print(f"{path} is not a readable judge ({type(e).__name__}); training it again")
    start = time.perf_counter()
    judge, accuracy = train_judge(data_dir, device, status)
    state = {"weights": judge.state_dict(), "test_accuracy": accuracy}
    atomic_write(path, lambda f: torch.save(state, f))
    status.print(f"trained the judge in {time.perf_counter() - start:.0f} s: {accuracy:.2%} test "
                 f"accuracy; cached as {path}")
    return judge, accuracy


def psd_sqrt(m):
    """The symmetric PSD square root of a symmetric PSD matrix, from its eigendecomposition; the
    tiny negative eigenvalues that rounding leaves are taken as 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh(m)
    return eigenvectors * eigenvalues.clamp(min=0).sqrt() @ eigenvectors.T


def frechet_distance(a, b):
    """The Frechet distance between Gaussians fitted to the feature sets a (N, D) and b (M, D),
    [Heusel] eq. 6, in float64: ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2). The trace of
    (S_a S_b)^1/2 is computed as that of (S_a^1/2 S_b S_a^1/2)^1/2, a root of a symmetric PSD
    matrix: the sum of the square roots of its eigenvalues."""
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(a)} and {len(b)}")

    def mean_covariance(x):
        x = x.double()
        mean = x.mean(0)
        return mean, (x - mean).T @ (x - mean) / (len(x) - 1)

    (mean_a, cov_a), (mean_b, cov_b) = mean_covariance(a), mean_covariance(b)
    root_a = psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def judge_images(judge, images, real):
    """How N images (N, 1, 28, 28) on [-1, 1], first rounded to 8 bits like the real digits, look
    to the judge. real: MNIST's uint8 test images, of which two disjoint sets of N are chosen with
    a fixed seed: A, which the images are compared with, and B, whose distance to A is the FID of
    samples as good as real digits, at this N (the FID of N samples is biased upwards, the more
    so the smaller N: compare FIDs at equal N only, or their ratios to this floor)."""
    n = len(images)
    if not 2 <= n <= len(real) // 2:
        raise UserError(f"the judge takes 2 to {len(real) // 2} images, got {n}")
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(JUDGE_RECIPE["seed"]))
    features, probabilities = judge_outputs(judge, to_unit_range(to_uint8(images)))
    real_a, _ = judge_outputs(judge, to_unit_range(real[order[:n], None]))
    real_b, _ = judge_outputs(judge, to_unit_range(real[order[n:2 * n], None]))
    fid, floor = frechet_distance(features, real_a), frechet_distance(real_b, real_a)
    counts = torch.bincount(probabilities.argmax(1), minlength=10)
    p = counts[counts > 0].double() / n
    return {"n": n, "fid": fid, "fid_floor": floor, "fid_ratio": fid / floor,
            "confident": (probabilities.max(1).values >= CONFIDENT).double().mean().item(),
            "classes": int((counts > 0).sum()), "class_entropy_bits": float((p * (1 / p).log2()).sum())}


def judge_samples(diffusion, model, n, sampler, steps, eta, seed, folder, data_dir, status):
    """Draw n samples and judge them with the judge of `folder` (trained first if need be). The
    result of judge_images, with the judge's test accuracy and the seconds spent sampling and in
    all."""
    start = time.perf_counter()
    judge, accuracy = load_judge(folder, data_dir, diffusion.betas.device, status)
    real, _ = load_split(data_dir, "mnist", "test", status)
    status.print(f"judge: drawing {n} samples ({sampler_name(sampler, steps, eta)})...")
    sampling = time.perf_counter()
    x0 = draw(diffusion, model, n, sampler, steps, eta, seed, chain=False)
    sample_seconds = time.perf_counter() - sampling
    result = judge_images(judge, x0, real)
    return result | {"judge_accuracy": accuracy, "sample_seconds": sample_seconds,
                     "seconds": time.perf_counter() - start}


def describe(result):
    """A judge_images result in one line."""
    return (f"FID {result['fid']:.2f} vs a real-vs-real floor of {result['fid_floor']:.2f} at "
            f"n={result['n']} (ratio {result['fid_ratio']:.2f}) | {result['confident']:.1%} "
            f"confident | {result['classes']}/10 classes, class entropy "
            f"{result['class_entropy_bits']:.2f} of 3.32 bits")


SKIP_JUDGE = "judge: skipped (it is an MNIST digit classifier; this is a Fashion-MNIST run)"


def append_metrics(folder, record):
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate(args):
    """--eval: judge --n samples of a checkpoint's EMA model, measure its bits/dim on --bpd-n test
    images, print both and append them as an "eval" line to metrics.jsonl beside the checkpoint."""
    start, status = time.perf_counter(), Status()
    path = args.ckpt or os.path.join(args.out, "checkpoint.pt")
    model, diffusion, config, step = load_ema(path, pick_device(args.device))
    steps = sample_steps(args.sampler, args.sample_steps, config["T"])
    folder, data_dir = os.path.dirname(path), args.data_dir or config["data_dir"]
    record = {"step": step, "sampler": args.sampler, "sample_steps": steps, "eta": args.eta,
              "seed": args.seed}
    status.print(f"{path}: step {step} of a {NAMES[config['dataset']]} run; "
                 f"{sampler_name(args.sampler, steps, args.eta)} sampler")
    if config["dataset"] != "mnist":
        status.print(SKIP_JUDGE)
    else:
        result = judge_samples(diffusion, model, args.n, args.sampler, steps, args.eta, args.seed,
                               folder,
                               data_dir, status)
        status.print(f"judge ({result['judge_accuracy']:.2%} test accuracy): {describe(result)} "
                     f"| {result['sample_seconds']:.0f} s sampling, {result['seconds']:.0f} s "
                     "in all")
        record |= result
    if args.bpd_n:
        test, _ = load_split(data_dir, config["dataset"], "test", status)
        order = torch.randperm(len(test),
                               generator=torch.Generator().manual_seed(JUDGE_RECIPE["seed"]))
        x0 = to_unit_range(test[order[:args.bpd_n], None]).to(diffusion.betas.device)
        status.print(f"bits/dim of {args.bpd_n} test images: T={config['T']} forward passes of "
                     f"them, as many as sampling {args.bpd_n * config['T'] // steps} in "
                     f"{steps} steps...")
        bpd_start, generator = time.perf_counter(), torch.Generator(x0.device).manual_seed(args.seed)
        with torch.no_grad():
            bpd = torch.cat([diffusion.bits_per_dim(model, part, generator)
                             for part in x0.split(256)]).double().cpu()
        stderr = bpd.std().item() / math.sqrt(len(bpd)) if len(bpd) > 1 else math.nan
        record |= {"bpd": bpd.mean().item(), "bpd_stderr": stderr, "bpd_n": len(bpd),
                   "bpd_seconds": time.perf_counter() - bpd_start}
        status.print(f"bits/dim {record['bpd']:.3f} +- {stderr:.3f} (standard error) in "
                     f"{record['bpd_seconds']:.0f} s")
    record["seconds"] = time.perf_counter() - start
    append_metrics(folder, {"eval": record})
    status.print(f"appended an eval line to {os.path.join(folder, 'metrics.jsonl')} "
                 f"({record['seconds']:.0f} s in all)")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonnegative_float(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def seed_value(text):
    value = nonnegative_int(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {text}")
    return value


def unit_interval(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def channel_count(text):
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (GroupNorm groups), got {text}")
    return value


def channel_mult(text):
    try:
        mult = [int(m) for m in text.split(",")]
    except ValueError:
        mult = []
    if not 1 <= len(mult) <= 3 or min(mult) < 1:
        raise argparse.ArgumentTypeError(f"must be 1 to 3 positive integers separated by commas "
                                         f"(e.g. 1,2,2), got {text}")
    return ",".join(map(str, mult))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train the DDPM of ddpm.py on MNIST or Fashion-MNIST, or sample from a "
                    "checkpoint. Defaults come from --preset; explicit flags override them.",
        epilog="Missing data files are downloaded into --data-dir from public mirrors; the "
               "environment variable MNIST_MIRRORS (base addresses separated by spaces) "
               "replaces the built-in list.")
    add = parser.add_argument
    add("--dataset", choices=sorted(NAMES), default="mnist", help="(default: %(default)s)")
    add("--data-dir", help="folder with the four IDX .gz files (default: data/<dataset>)")
    add("--out", help="run folder (default: runs/<dataset>)")
    add("--preset", choices=sorted(PRESETS), default="fast",
        help="fast: digits in ~15 min on a CPU; paper: [Ho]'s recipe, for GPUs (default: fast)")
    add("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
        help="auto: cuda, else mps, else cpu (default: %(default)s)")
    add("--seed", type=seed_value, default=0, help="(default: %(default)s)")
    add("--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="training arithmetic: auto is bf16 autocast on CUDA and on CPUs with native bf16 "
             "(AVX512-BF16, AMX), else fp32; sampling is always fp32 (default: %(default)s)")
    model = parser.add_argument_group("model and diffusion (fixed for the life of a run)")
    model.add_argument("--channels", type=channel_count,
                       help="base width of the U-Net (default: %(default)s)")
    model.add_argument("--channel-mult", type=channel_mult,
                       help="width of each U-Net level in units of --channels; 28x28 images "
                            "allow 1 to 3 levels (default: %(default)s)")
    model.add_argument("--res-blocks", type=positive_int,
                       help="residual blocks per U-Net level (default: %(default)s)")
    model.add_argument("--dropout", type=fraction, help="(default: %(default)s)")
    model.add_argument("--T", type=positive_int, help="diffusion steps (default: %(default)s)")
    model.add_argument("--schedule", choices=["linear", "cosine"],
                       help="beta schedule (default: %(default)s)")
    model.add_argument("--prediction", choices=["eps", "x0", "v"],
                       help="what the U-Net predicts: the noise, the clean image, or "
                            "v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x0 (default: %(default)s)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=positive_int,
                     help="train until this many optimizer steps (default: %(default)s)")
    opt.add_argument("--batch-size", type=positive_int, help="(default: %(default)s)")
    opt.add_argument("--lr", type=positive_float,
                     help="AdamW learning rate after the warm-up (default: %(default)s)")
    opt.add_argument("--warmup", type=nonnegative_int,
                     help="steps of linear learning-rate warm-up (default: %(default)s)")
    opt.add_argument("--lr-schedule", choices=["constant", "cosine"],
                     help="after the warm-up: constant, or down to 0 at --steps along a half "
                          "cosine (resuming with a larger --steps then raises it again) "
                          "(default: %(default)s)")
    opt.add_argument("--weight-decay", type=nonnegative_float, help="(default: %(default)s)")
    opt.add_argument("--grad-clip", type=nonnegative_float,
                     help="max gradient norm, 0 for none (default: %(default)s)")
    opt.add_argument("--ema-decay", type=fraction,
                     help="decay of the weight average used for sampling (default: %(default)s)")
    out = parser.add_argument_group("pictures and checkpoints")
    out.add_argument("--sampler", choices=["ddpm", "ddim"],
                     help="ddpm: Algorithm 2 over all T steps; ddim: [Song]'s sampler in "
                          "--sample-steps steps (default: %(default)s)")
    out.add_argument("--sample-steps", type=positive_int,
                     help="steps of the ddim sampler (default: 50); ddpm takes all T")
    out.add_argument("--eta", type=unit_interval,
                     help="stochasticity of the ddim sampler: 0 deterministic, 1 as noisy as "
                          "ddpm's (default: %(default)s)")
    out.add_argument("--n", type=positive_int,
                     help=f"samples per grid (default: 64), or judged by --eval (default: {EVAL_N})")
    out.add_argument("--sample-every", type=positive_int,
                     help="steps between sample grids (default: %(default)s)")
    out.add_argument("--ckpt-every", type=positive_int,
                     help="steps between checkpoints (default: %(default)s)")
    out.add_argument("--sample-only", action="store_true",
                     help="write a grid of --n samples from --ckpt beside it, and exit")
    out.add_argument("--ckpt",
                     help="checkpoint for --sample-only and --eval (default: <out>/checkpoint.pt)")
    judge = parser.add_argument_group(
        "judging samples", "The judge is a small CNN trained on MNIST's training set (about a "
        "minute on a CPU, cached as judge.pt in the run folder). It judges MNIST runs only: "
        "Fashion-MNIST runs skip it. It reports the FID of its 64 features (samples vs real test "
        "digits) beside the floor of real vs real test digits at the same N, the fraction of "
        "samples it classifies with >= 90% confidence, and how evenly they spread over the 10 "
        "digits.")
    judge.add_argument("--eval", action="store_true",
                       help="judge --n samples from --ckpt, measure its bits/dim on --bpd-n test "
                            "images, append an eval line to metrics.jsonl beside it, and exit")
    judge.add_argument("--bpd-n", type=nonnegative_int, default=64,
                       help="test images for the bits/dim of --eval, 0 for none; each costs T "
                            "forward passes (default: %(default)s)")
    judge.add_argument("--judge-n", type=nonnegative_int, default=256,
                       help="samples judged at the end of a training run, 0 for none "
                            "(default: %(default)s)")

    # The flags given on the command line: --resume takes every other setting from the checkpoint.
    only_given = copy.deepcopy(parser)
    for action in only_given._actions:
        action.default = argparse.SUPPRESS
    # The preset decides the defaults, so find it first; the full parse reports a bad value.
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="fast")
    preset = first.parse_known_args(argv)[0].preset
    parser.set_defaults(**PRESETS.get(preset, PRESETS["fast"]))
    args = parser.parse_args(argv)
    given = frozenset(vars(only_given.parse_args(argv)))
    if not args.eval:                 # --eval reads the data of its checkpoint's run by default
        args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    if args.data_dir:                 # absolute, so that --eval and --resume find it from anywhere
        args.data_dir = os.path.abspath(args.data_dir)
    args.out = args.out or os.path.join("runs", args.dataset)
    args.n = args.n or (EVAL_N if args.eval else 64)
    if args.ckpt and not (args.sample_only or args.eval):
        parser.error("--ckpt is for --sample-only and --eval; to continue a run use --resume "
                     "with its --out")
    if args.sample_only and args.eval:
        parser.error("--sample-only and --eval exclude each other")
    if args.resume and (args.sample_only or args.eval):
        parser.error("--resume is for training; --sample-only and --eval read --ckpt")
    if not args.eval and args.n > 1024:
        parser.error(f"--n: a grid holds at most 1024 samples, got {args.n}")
    most = SPLITS["test"][2] // 2     # the judge's two real sets of N come from the test set
    if args.eval and not 2 <= args.n <= most:
        parser.error(f"--eval judges 2 to {most} samples, got --n {args.n}")
    if args.judge_n == 1 or args.judge_n > most:
        parser.error(f"--judge-n must be 0 or 2 to {most}, got {args.judge_n}")
    if args.bpd_n > SPLITS["test"][2]:
        parser.error(f"--bpd-n must be at most {SPLITS['test'][2]}, got {args.bpd_n}")
    return args, given


def main(argv=None):
    args, given = parse_args(argv)
    try:
        if args.sample_only:
            return sample_only(args)
        if args.eval:
            return evaluate(args)
        return train(args, given)
    except (UserError, OSError) as e:           # OSError: a path, a permission, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
