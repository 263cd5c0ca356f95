"""Denoising Diffusion Probabilistic Models in one file.

References
    [Ho]     Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (eq. and Alg. numbers).
    [Nichol] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (cosine schedule).
    [Song]   Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM sampler).
    [Salim]  Salimans, Ho 2022, "Progressive Distillation for Fast Sampling" (v-prediction).

Notation, as in [Ho]
    x0              data, scaled to [-1, 1]             x_t  noised data at step t
    betas           beta_t, the forward noise variances  alphas = 1 - betas
    alphas_cumprod  alpha-bar_t = prod_{s<=t} alpha_s    eps  standard Gaussian noise

Timestep convention: an integer tensor `t` with values in 0..T-1 (one per batch element) indexes the
paper's t = 1..T. So t = 0 is the paper's t = 1, the last denoising step, and T-1 is pure noise.
A t outside 0..T-1 raises ValueError on the CPU; on accelerators that check is skipped, as it would
make every call wait for the device.

Torch is the only dependency: copy this file into your project.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Noise schedules: beta_1..beta_T as a float64 tensor of shape (T,)
# ---------------------------------------------------------------------------------------------


def linear_beta_schedule(T, beta_start=1e-4, beta_end=0.02):
    """[Ho] sec. 4: betas increase linearly from beta_start to beta_end."""
    if not (isinstance(T, int) and not isinstance(T, bool) and T >= 1):
        raise ValueError(f"T must be an integer >= 1, got {T!r}")
    if not 0 < beta_start <= beta_end <= 1:
        raise ValueError(f"need 0 < beta_start <= beta_end <= 1, got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_beta_schedule(T, s=0.008, max_beta=0.999):
    """[Nichol] eq. 17: alpha-bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2);
    beta_t = 1 - alpha-bar(t) / alpha-bar(t-1), clipped at max_beta to avoid a singularity at t=T."""
    if not (isinstance(T, int) and not isinstance(T, bool) and T >= 1):
        raise ValueError(f"T must be an integer >= 1, got {T!r}")
    if not (s >= 0 and 0 < max_beta <= 1):
        raise ValueError(f"need s >= 0 and 0 < max_beta <= 1, got s={s}, max_beta={max_beta}")
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)


def extract(a, t, x):
    """Gather the per-timestep constants a[t] (a: (T,), t: (B,)) and shape them (B, 1, ..., 1) to
    broadcast against x: (B, ...)."""
    if t.dtype not in (torch.int32, torch.int64) or t.shape != x.shape[:1]:
        raise ValueError(f"t must be an integer tensor of shape ({x.shape[0]},), one step per "
                         f"batch element; got dtype {t.dtype}, shape {tuple(t.shape)}")
    if t.device.type == "cpu" and not bool(((t >= 0) & (t < a.shape[0])).all()):
        raise ValueError(f"t must lie in 0..{a.shape[0] - 1}, got values from "
                         f"{int(t.min())} to {int(t.max())}")
    return a[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _check_data(x, name="x0"):
    if not (torch.is_tensor(x) and x.is_floating_point() and x.dim() >= 2):
        raise ValueError(f"{name} must be a floating-point tensor shaped (batch, ...); got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


class GaussianDiffusion(nn.Module):
    """The forward process q, the reverse process p, the training loss, samplers and the
    variational bound for a given beta schedule. It does not own the network: every method that
    needs one takes `model`, any callable model(x_t, t) -> tensor shaped like x_t.

    prediction: what the model outputs -- "eps" (the noise, [Ho]), "x0" (the clean data) or
                "v" = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x0 ([Salim]).
    variance:   the fixed reverse-process variance sigma_t^2 ([Ho] sec. 3.2): "beta" (fixed large)
                or "beta_tilde" (the posterior variance, fixed small). Default "beta": [Ho] report
                equal sample quality for both and used it for their released CIFAR-10 models, and
                it is the right choice when x0 is spread out rather than a single point.
    The constants are computed in float64 and stored as float32 buffers, so `.to(device)` works.
    """

    def __init__(self, betas, prediction="eps", variance="beta"):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]")
        if prediction not in ("eps", "x0", "v"):
            raise ValueError(f'prediction must be "eps", "x0" or "v", got {prediction!r}')
        if variance not in ("beta", "beta_tilde"):
            raise ValueError(f'variance must be "beta" or "beta_tilde", got {variance!r}')
        self.prediction, self.variance, self.T = prediction, variance, len(betas)

        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        if alphas_cumprod.float()[-1] == 0:    # eq. 4 could not be inverted for x0 at the end
            raise ValueError("alpha-bar_T is 0 in float32 (a beta of 1, or too much noise): x_T "
                             "keeps no trace of x0; use betas < 1, e.g. max_beta=0.999")
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # eq. 7: q(x_{t-1} | x_t, x0) = N(posterior_mean_coef1 x0 + posterior_mean_coef2 x_t,
        #                                  posterior_variance)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        # beta-tilde is 0 at the first step; its log takes the second value there to stay finite
        # (beta_1 when T = 1 and there is no second value).
        first = posterior_variance[1:2] if len(betas) > 1 else betas
        clipped = torch.cat([first, posterior_variance[1:]])
        # sigma_t^2 of p(x_{t-1} | x_t). At the first step it only sets the decoder's width (eq. 13;
        # Algorithm 2 adds no noise there); both choices take beta-tilde_2 there, as the decoder of
        # [Ho]'s released code does (beta-tilde_1 = 0 would give the decoder no width at all).
        fixed = betas if variance == "beta" else posterior_variance
        model_variance = torch.cat([first, fixed[1:]])
        constants = {
            "betas": betas, "alphas": alphas, "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": clipped.log(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
            "model_variance": model_variance,
            "model_log_variance": model_variance.log(),
        }
        for name, value in constants.items():
            self.register_buffer(name, value.float())

    # --- Forward process ------------------------------------------------------------------------

    def q_mean_variance(self, x0, t):
        """eq. 4: q(x_t | x0) = N(sqrt(alpha-bar_t) x0, (1 - alpha-bar_t) I)."""
        _check_data(x0)
        mean = extract(self.sqrt_alphas_cumprod, t, x0) * x0
        # Squared from the float64-derived buffer: 1 - alpha-bar in float32 loses digits near 1.
        variance = extract(self.sqrt_one_minus_alphas_cumprod, t, x0) ** 2
        return mean, variance

    def q_sample(self, x0, t, noise=None):
        """eq. 4, reparameterised: x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) eps."""
        _check_data(x0)
        noise = torch.randn_like(x0) if noise is None else noise
        return (extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """eqs. 6-7: mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        _check_data(x0)
        mean = (extract(self.posterior_mean_coef1, t, x_t) * x0
                + extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, extract(self.posterior_variance, t, x_t),
                extract(self.posterior_log_variance_clipped, t, x_t))

    # --- Parameterisations: eps, x0 and v, and the conversions between them ---------------------

    def training_target(self, x0, noise, t):
        """What the model should output for x_t = q_sample(x0, t, noise)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return (extract(self.sqrt_alphas_cumprod, t, x0) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    def predict_x0_eps(self, model_output, x_t, t):
        """Invert eq. 4 for whichever quantity the model predicts; returns (x0, eps)."""
        a = extract(self.sqrt_alphas_cumprod, t, x_t)
        b = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction == "eps":
            return (x_t - b * model_output) / a, model_output
        if self.prediction == "x0":
            return model_output, self.eps_from_x0(model_output, x_t, t)
        # x_t = a x0 + b eps and v = a eps - b x0 with a^2 + b^2 = 1 is a rotation; invert it.
        return a * x_t - b * model_output, b * x_t + a * model_output

    def eps_from_x0(self, x0, x_t, t):
        """eq. 4 solved for the noise: eps = (x_t - sqrt(alpha-bar_t) x0) / sqrt(1 - alpha-bar_t)."""
        return ((x_t - extract(self.sqrt_alphas_cumprod, t, x_t) * x0)
                / extract(self.sqrt_one_minus_alphas_cumprod, t, x_t))

    @staticmethod
    def _run(model, x_t, t):
        """model(x_t, t), which must be shaped like x_t (a broadcast would hide a wrong model)."""
        model_output = model(x_t, t)
        if model_output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} != input shape "
                             f"{tuple(x_t.shape)}")
        return model_output

    def _denoise(self, model, x_t, t, clip_denoised):
        """Run the model; return its (x0, eps), with x0 clipped to the data range [-1, 1] and eps
        made consistent with the clipped x0 when clip_denoised."""
        x0, eps = self.predict_x0_eps(self._run(model, x_t, t), x_t, t)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = self.eps_from_x0(x0, x_t, t)
        return x0, eps

    # --- Reverse process ------------------------------------------------------------------------

    def p_mean_variance(self, model, x_t, t, clip_denoised=True):
        """eq. 1 / sec. 3.2: p(x_{t-1} | x_t) = N(mean, sigma_t^2 I), with the mean the posterior
        mean (eq. 7) at the model's prediction of x0 -- for eps-prediction without clipping this is
        eq. 11; with clip_denoised, x0 is clipped to [-1, 1] first."""
        _check_data(x_t, "x_t")
        pred_x0, _ = self._denoise(model, x_t, t, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": extract(self.model_variance, t, x_t),
                "log_variance": extract(self.model_log_variance, t, x_t), "pred_x0": pred_x0}

    def training_loss(self, model, x0, t=None, noise=None):
        """Algorithm 1 / eq. 14 (L_simple): t ~ Uniform, eps ~ N(0, I), MSE to the target."""
        _check_data(x0)
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        model_output = self._run(model, self.q_sample(x0, t, noise), t)
        return F.mse_loss(model_output, self.training_target(x0, noise, t))

    @torch.no_grad()
    def p_sample(self, model, x_t, t, generator=None, clip_denoised=True):
        """Algorithm 2, one step: x_{t-1} = mean + sigma_t z, with no noise at the last step."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised)
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        not_last = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return out["mean"] + not_last * (0.5 * out["log_variance"]).exp() * z

    @torch.no_grad()
    def sample(self, model, shape, generator=None, clip_denoised=True, return_chain=False):
        """Algorithm 2: x_T ~ N(0, I), then T steps of p_sample. Put the model in eval mode first.
        Returns x0 of `shape`, or with return_chain all T + 1 states, shaped (T + 1, *shape)."""
        x = torch.randn(shape, generator=generator, device=self.betas.device)
        chain = [x]
        for i in reversed(range(self.T)):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            x = self.p_sample(model, x, t, generator, clip_denoised)
            if return_chain:
                chain.append(x)
        return torch.stack(chain) if return_chain else x

    @torch.no_grad()
    def ddim_sample(self, model, shape, steps=50, eta=0.0, generator=None, clip_denoised=True,
                    return_chain=False):
        """[Song] eq. 12 over `steps` timesteps from T-1 down to 0 (just T-1 when steps = 1):
        x_s = sqrt(alpha-bar_s) x0 + sqrt(1 - alpha-bar_s - sigma^2) eps + sigma z, where ([Song]
        eq. 16) sigma = eta sqrt((1 - alpha-bar_s) / (1 - alpha-bar_t)) sqrt(1 - alpha-bar_t / alpha-bar_s).
        eta = 0 is deterministic given x_T; eta = 1 with steps = T is Algorithm 2 with beta-tilde.
        sigma comes from eta, so the `variance` setting plays no part here.
        Returns x0, or with return_chain all steps + 1 states, shaped (steps + 1, *shape)."""
        if not (isinstance(steps, int) and 1 <= steps <= self.T):
            raise ValueError(f"steps must be an integer in 1..{self.T}, got {steps!r}")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        # Spacing (T-1)/(steps-1) >= 1, so rounding keeps the timesteps distinct (in float64: float32
        # rounding errors exceed the half-step margin once T is in the thousands).
        timesteps = torch.linspace(self.T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        x = torch.randn(shape, generator=generator, device=self.betas.device)
        chain = [x]
        for i, step in enumerate(timesteps):
            t = torch.full((shape[0],), step, device=x.device, dtype=torch.long)
            x0, eps = self._denoise(model, x, t, clip_denoised)
            ab_t = self.alphas_cumprod[step]
            ab_s = self.alphas_cumprod[timesteps[i + 1]] if i + 1 < steps else ab_t.new_ones(())
            sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()
            z = torch.randn(shape, generator=generator, device=x.device)
            # 1 - alpha-bar_s - sigma^2 >= 0 for eta <= 1; the clamp only absorbs rounding.
            x = ab_s.sqrt() * x0 + (1 - ab_s - sigma**2).clamp(min=0).sqrt() * eps + sigma * z
            if return_chain:
                chain.append(x)
        return torch.stack(chain) if return_chain else x

    # --- Variational bound (eq. 5), in bits per dimension ---------------------------------------

    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x0) || N(0, I)), per sample, in bits/dim."""
        t = torch.full((x0.shape[0],), self.T - 1, device=x0.device, dtype=torch.long)
        mean, variance = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, variance.log(), torch.zeros_like(mean), torch.zeros_like(mean))
        return mean_flat(kl) / math.log(2)

    def vb_term_bpd(self, model, x0, x_t, t):
        """L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 (paper t > 1), and the
        decoder L_0 = -log p(x0 | x_1) at t = 0 (eq. 5, sec. 3.3); per sample, in bits/dim."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        return torch.where(t == 0, mean_flat(nll), mean_flat(kl)) / math.log(2)

    @torch.no_grad()
    def bits_per_dim(self, model, x0, generator=None):
        """eq. 5 summed exactly over all T steps: L_T + sum_{t>1} L_{t-1} + L_0, per sample, in bits
        per dimension. x0 must be 8-bit data scaled to [-1, 1]; each step draws a fresh x_t."""
        total = self.prior_bpd(x0)
        for i in range(self.T):
            t = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
            total = total + self.vb_term_bpd(model, x0, self.q_sample(x0, t, noise), t)
        return total


def mean_flat(x):
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1 + (logvar1 - logvar2).exp()
                  + (mean1 - mean2) ** 2 * (-logvar2).exp())


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """eq. 13: log-probability of 8-bit data x on [-1, 1] under N(mean, exp(log_scale)^2)
    integrated over its bin of width 2/255; the edge bins extend to -inf and +inf."""
    centered = x - mean
    inv_std = (-log_scale).exp()
    upper = inv_std * (centered + 1 / 255)
    lower = inv_std * (centered - 1 / 255)
    middle = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12).log()
    return torch.where(x < -0.999, torch.special.log_ndtr(upper),
                       torch.where(x > 0.999, torch.special.log_ndtr(-lower), middle))


# ---------------------------------------------------------------------------------------------
# The network: a U-Net that predicts eps (or x0, or v) from (x_t, t), as in [Ho] appendix B
# ---------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """Transformer sinusoidal embedding of t ([Ho] appendix B), then a 2-layer MLP."""

    def __init__(self, channels, dim):
        super().__init__()
        half = channels // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(half) / half))
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):                                      # t: (B,) -> (B, dim)
        angles = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the time embedding, GroupNorm -> SiLU -> dropout -> conv,
    plus a (1x1-projected) skip. GroupNorm, not BatchNorm: each sample is independent of the batch."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, groups):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(groups, in_ch), nn.SiLU(),
                                    nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.block2 = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                    nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):                                 # x: (B, C, H, W), emb: (B, E)
        h = self.block1(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.block2(h)


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):                                      # x: (B, C, H, W)
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class Block(nn.Module):
    """A residual block, followed by self-attention when `attn`."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, groups, attn):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout, groups)
        self.attn = SelfAttention(out_ch, groups) if attn else nn.Identity()

    def forward(self, x, emb):
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """model(x_t, t) -> tensor shaped like x_t. Level i works at 1/2^i of the input size with
    base_channels * channel_mult[i] channels and num_res_blocks residual blocks; self-attention
    follows each block at the levels whose size, for an image_size input, is in attn_resolutions.
    Any height and width divisible by 2^(len(channel_mult) - 1) pass through."""

    def __init__(self, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                 attn_resolutions=(7,), dropout=0.1, image_size=28, groups=8):
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        if any(w % groups for w in widths):
            raise ValueError(f"every level width {widths} must be divisible by groups={groups}")
        sizes = [image_size // 2**i for i in range(len(channel_mult))]
        if not set(attn_resolutions) <= set(sizes):
            raise ValueError(f"attn_resolutions {attn_resolutions} not among the level sizes {sizes}")
        self.in_channels, self.factor = in_channels, 2 ** (len(channel_mult) - 1)
        emb_dim = 4 * base_channels
        self.time_embed = TimestepEmbedding(base_channels, emb_dim)
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down, skips, ch = nn.ModuleList(), [base_channels], base_channels
        for level, (width, size) in enumerate(zip(widths, sizes)):
            for _ in range(num_res_blocks):
                self.down.append(Block(ch, width, emb_dim, dropout, groups, size in attn_resolutions))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:                        # stride-2 conv halves H and W
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        # The middle: res, attn, res.
        self.middle = Block(ch, ch, emb_dim, dropout, groups, attn=True)
        self.middle_res = ResBlock(ch, ch, emb_dim, dropout, groups)
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):                # each block takes one skip
                self.up.append(Block(ch + skips.pop(), widths[level], emb_dim, dropout, groups,
                                     sizes[level] in attn_resolutions))
                ch = widths[level]
            if level > 0:                                      # nearest x2, then a 3x3 conv
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(),
                                 nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(self, x, t):                                   # x: (B, C, H, W), t: (B,)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input shaped (B, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            fit = "x".join(str(-(-n // self.factor) * self.factor) for n in x.shape[2:])
            raise ValueError(f"height and width must be multiples of {self.factor}, got "
                             f"{x.shape[2]}x{x.shape[3]}; pad the input to {fit}, for example")
        emb = self.time_embed(t)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Block) else layer(h)
            skips.append(h)
        h = self.middle_res(self.middle(h, emb), emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, Block) else layer(h)
        return self.out(h)
