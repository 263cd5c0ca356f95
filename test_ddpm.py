"""Property-based tests of the math in ddpm.py.

Tests check properties against references that do not reuse the formula under test: a float64
formula written independently (often in a different but equivalent form), an analytic result, or
a Monte Carlo estimate. (A few structural checks, such as the noise scale of one p_sample step,
take the code's own p_mean_variance or buffers as given once those are tested elsewhere.) Monte
Carlo checks allow K = 6 standard errors, computed from the number of draws: for a mean, a correct
implementation fails one such check with probability about 2e-9 (normal approximation; sample
variances are chi-square, close to normal at these sizes), so even the few hundred checks of the
suite together fail with probability below 1e-6; and all draws are seeded, so the suite is
deterministic.

Hypothesis profiles: "ci" (the default: few examples, no deadline, derandomized, so every run
tries the same examples) and "dev" (more, random examples): HYPOTHESIS_PROFILE=dev pytest.
"""

import itertools
import math
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ddpm

settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True, database=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

K = 6.0                                     # Monte Carlo tolerance, in standard errors
SCHEDULES = {"linear": ddpm.linear_beta_schedule, "cosine": ddpm.cosine_beta_schedule}


# --- Independent references ------------------------------------------------------------------


def ref_alphas_cumprod(betas):
    """alpha-bar_t, t = 1..T, as float64 Python floats by an explicit running product."""
    out, prod = [], 1.0
    for beta in betas.tolist():
        prod *= 1.0 - beta
        out.append(prod)
    return out


def short_schedule(T):
    """[Ho]'s linear schedule rescaled to T steps (betas times 1000 / T): alpha-bar_T ~ 4.5e-5."""
    return ddpm.linear_beta_schedule(T, 0.1 / T, 20 / T)


def assert_gaussian_moments(samples, mean, var):
    """samples: N i.i.d. draws that should be N(mean, var). Their sample mean has standard error
    sqrt(var / N) and their unbiased sample variance var * sqrt(2 / (N - 1)) (exact for
    Gaussians); both must lie within K standard errors."""
    samples = samples.double().flatten()
    n = samples.numel()
    assert abs(samples.mean().item() - mean) <= K * math.sqrt(var / n), (samples.mean(), mean)
    assert abs(samples.var().item() - var) <= K * var * math.sqrt(2 / (n - 1)), (samples.var(), var)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are small: one intra-op thread is fastest, and avoids the thread
    contention that slows torch down by orders of magnitude on busy shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- Schedules -------------------------------------------------------------------------------


@given(T=st.integers(1, 4000), kind=st.sampled_from(sorted(SCHEDULES)))
def test_schedule_and_cumulative_products(T, kind):
    """Both schedules, any T: float64 betas in (0, 1]; the diffusion's alphas = 1 - beta,
    alphas_cumprod strictly decreasing in (0, 1) and equal to an explicit float64 running product
    (to float32 rounding, rtol 1e-6), alphas_cumprod_prev = 1 then alpha-bar shifted by one."""
    betas = SCHEDULES[kind](T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert bool(((betas > 0) & (betas <= 1)).all())
    diffusion = ddpm.GaussianDiffusion(betas)
    assert diffusion.T == T
    ab = torch.tensor(ref_alphas_cumprod(betas), dtype=torch.float64)
    torch.testing.assert_close(diffusion.alphas.double(), 1 - betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(diffusion.alphas_cumprod.double(), ab, rtol=1e-6, atol=0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    torch.testing.assert_close(diffusion.alphas_cumprod_prev.double(), ab_prev, rtol=1e-6, atol=0)
    assert bool((diffusion.alphas_cumprod[1:] < diffusion.alphas_cumprod[:-1]).all())
    assert bool(((diffusion.alphas_cumprod > 0) & (diffusion.alphas_cumprod < 1)).all())


@given(T=st.integers(1, 4000), s=st.floats(0, 0.1), max_beta=st.floats(0.05, 1))
def test_cosine_alpha_bar_matches_closed_formula(T, s, max_beta):
    """[Nichol] eq. 17: up to the first clipped beta, the running product of 1 - beta equals
    f(t) / f(0) with f(t) = cos^2((t / T + s) / (1 + s) pi / 2), evaluated with math.cos (rtol
    1e-8: float64 rounding over <= 4000 factors); a beta is max_beta exactly where the formula's
    beta exceeds it, and never above."""
    betas = ddpm.cosine_beta_schedule(T, s=s, max_beta=max_beta).tolist()

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    prod = 1.0
    for t, beta in enumerate(betas, start=1):
        formula_beta = 1 - f(t) / f(t - 1)
        if formula_beta >= max_beta:
            assert beta == max_beta
            break
        assert beta <= max_beta
        prod *= 1 - beta
        assert math.isclose(prod, f(t) / f(0), rel_tol=1e-8), (t, prod, f(t) / f(0))


@given(T=st.integers(2, 4000), beta_start=st.floats(1e-6, 0.1), width=st.floats(0, 0.5))
def test_linear_schedule_endpoints_exact_and_evenly_spaced(T, beta_start, width):
    """[Ho] sec. 4: the first and last betas are exactly beta_start and beta_end, and consecutive
    differences all equal (beta_end - beta_start) / (T - 1) (to float64 rounding)."""
    beta_end = beta_start + width
    betas = ddpm.linear_beta_schedule(T, beta_start, beta_end)
    assert betas[0].item() == beta_start and betas[-1].item() == beta_end
    step = (beta_end - beta_start) / (T - 1)
    torch.testing.assert_close(betas.diff(), torch.full((T - 1,), step, dtype=torch.float64),
                               rtol=0, atol=1e-15)


# --- Forward process -------------------------------------------------------------------------


@given(x0=st.floats(-1, 1), frac=st.floats(0, 1), kind=st.sampled_from(sorted(SCHEDULES)))
def test_q_sample_statistics_match_eq4(x0, frac, kind):
    """eq. 4: for fixed x0 and t, 100k draws of q_sample have mean sqrt(alpha-bar) x0 and variance
    1 - alpha-bar (alpha-bar from the float64 running product), within K standard errors;
    q_mean_variance returns those values (rtol 1e-6, float32), and q_sample with given noise is
    sqrt(alpha-bar) x0 + sqrt(1 - alpha-bar) noise."""
    T, n = 1000, 100_000
    diffusion = ddpm.GaussianDiffusion(SCHEDULES[kind](T))
    step = round(frac * (T - 1))
    ab = ref_alphas_cumprod(SCHEDULES[kind](T))[step]
    x = torch.full((n, 1), x0)
    t = torch.full((n,), step)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert_gaussian_moments(diffusion.q_sample(x, t), math.sqrt(ab) * x0, 1 - ab)
    mean, var = diffusion.q_mean_variance(x[:1], t[:1])
    assert math.isclose(mean.item(), math.sqrt(ab) * x0, rel_tol=1e-6, abs_tol=1e-30)
    assert math.isclose(var.item(), 1 - ab, rel_tol=1e-6)
    noise = torch.randn(8, 1, generator=seeded(1), dtype=torch.float64)
    expected = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise
    torch.testing.assert_close(diffusion.q_sample(x[:8].double(), t[:8], noise), expected,
                               rtol=1e-6, atol=1e-6)


@settings(max_examples=4)
@given(x0=st.floats(-1, 1), kind=st.sampled_from(sorted(SCHEDULES)))
def test_composed_one_step_transitions_match_closed_form(x0, kind):
    """q(x_t | x0) in closed form (eq. 4) is t one-step transitions
    x_s = sqrt(1 - beta_s) x_{s-1} + sqrt(beta_s) z composed: simulate them in float64 for 50k
    chains of T = 100 steps; after every step the sample mean and variance match q_mean_variance
    within K standard errors."""
    T, n = 100, 50_000
    betas = SCHEDULES[kind](T)
    diffusion = ddpm.GaussianDiffusion(betas)
    g = seeded(0)
    x = torch.full((n,), x0, dtype=torch.float64)
    for step, beta in enumerate(betas.tolist()):
        z = torch.randn(n, generator=g, dtype=torch.float64)
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * z
        mean, var = diffusion.q_mean_variance(torch.tensor([[x0]]), torch.tensor([step]))
        assert_gaussian_moments(x, mean.item(), var.item())


# --- Posterior -------------------------------------------------------------------------------


@given(T=st.integers(1, 1000), kind=st.sampled_from(sorted(SCHEDULES)), seed=st.integers(0, 99))
def test_posterior_is_gaussian_conditioning(T, kind, seed):
    """eqs. 6-7 at every t: q(x_{t-1} | x_t, x0) is the product of q(x_t | x_{t-1}) =
    N(sqrt(alpha_t) x_{t-1}, beta_t) and q(x_{t-1} | x0) = N(sqrt(alpha-bar_{t-1}) x0,
    1 - alpha-bar_{t-1}), normalised: precision 1 / (1 - alpha-bar_{t-1}) + alpha_t / beta_t, mean =
    variance * (precision-weighted sum of the two means), computed in float64. At the first step
    the prior is a point mass, so the posterior is x0 with variance 0. Tolerance: float32
    constants, rtol 1e-5 plus 1e-6 (|x0| + |x_t|)."""
    betas = SCHEDULES[kind](T)
    diffusion = ddpm.GaussianDiffusion(betas)
    x0 = torch.randn(T, 1, generator=seeded(seed), dtype=torch.float64)
    x_t = 2 * torch.randn(T, 1, generator=seeded(seed + 1), dtype=torch.float64)
    t = torch.arange(T)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    assert mean[0].item() == pytest.approx(x0[0].item(), rel=1e-6) and var[0].item() == 0
    ab = ref_alphas_cumprod(betas)
    for i in range(1, T):
        beta, ab_prev = betas[i].item(), ab[i - 1]
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta
        ref_var = 1 / precision
        ref_mean = ref_var * (math.sqrt(ab_prev) * x0[i].item() / (1 - ab_prev)
                              + math.sqrt(1 - beta) * x_t[i].item() / beta)
        atol = 1e-6 * (abs(x0[i].item()) + abs(x_t[i].item()))
        assert mean[i].item() == pytest.approx(ref_mean, rel=1e-5, abs=atol), i
        assert var[i].item() == pytest.approx(ref_var, rel=1e-5), i
        assert log_var[i].item() == pytest.approx(math.log(ref_var), abs=1e-5), i


@given(T=st.integers(1, 4000), kind=st.sampled_from(sorted(SCHEDULES)))
def test_posterior_variance_bounds_and_clipped_log(T, kind):
    """beta-tilde_t = beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) <= beta_t, since alpha-bar
    decreases; it is 0 at the first step (alpha-bar_0 = 1) and > 0 after. Its clipped log is
    finite everywhere, equals log beta-tilde after the first step, and repeats the second value at
    the first. The model variances are beta or beta-tilde, with matching logs, except that at the
    first step, where only the decoder uses it, both take beta-tilde_2 (beta_1 when T = 1)."""
    betas = SCHEDULES[kind](T)
    for variance in ("beta", "beta_tilde"):
        d = ddpm.GaussianDiffusion(betas, variance=variance)
        assert bool((d.posterior_variance <= d.betas).all())
        assert d.posterior_variance[0] == 0 and bool((d.posterior_variance[1:] > 0).all())
        clipped = d.posterior_log_variance_clipped
        assert clipped.shape == (T,) and bool(clipped.isfinite().all())
        torch.testing.assert_close(clipped[1:], d.posterior_variance[1:].log())
        if T > 1:
            assert clipped[0] == clipped[1]
        fixed = d.betas if variance == "beta" else d.posterior_variance
        torch.testing.assert_close(d.model_variance[1:], fixed[1:], rtol=0, atol=0)
        assert d.model_log_variance.shape == (T,) and bool(d.model_log_variance.isfinite().all())
        torch.testing.assert_close(d.model_log_variance, d.model_variance.log())
        ab = ref_alphas_cumprod(betas)
        first = betas[1].item() * (1 - ab[0]) / (1 - ab[1]) if T > 1 else betas[0].item()
        assert d.model_variance[0].item() == pytest.approx(first, rel=1e-6)


# --- Parameterisations -----------------------------------------------------------------------


@given(prediction=st.sampled_from(["eps", "x0", "v"]), T=st.integers(1, 1000),
       kind=st.sampled_from(sorted(SCHEDULES)), seed=st.integers(0, 99))
def test_parameterisations_round_trip(prediction, T, kind, seed):
    """At every t: training_target is eps, x0 or v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x0
    ([Salim] sec. 4, float64 reference), and predict_x0_eps maps it together with
    x_t = q_sample(x0, t, eps) back to (x0, eps) exactly. Done in float64, so the only error is
    the float32 rounding of the constants (which makes a^2 + b^2 = 1 hold to ~1e-7): rtol 1e-5."""
    betas = SCHEDULES[kind](T)
    diffusion = ddpm.GaussianDiffusion(betas, prediction=prediction)
    x0 = torch.randn(T, 3, generator=seeded(seed), dtype=torch.float64)
    eps = torch.randn(T, 3, generator=seeded(seed + 1), dtype=torch.float64)
    t = torch.arange(T)
    ab = torch.tensor(ref_alphas_cumprod(betas), dtype=torch.float64)[:, None]
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    target = diffusion.training_target(x0, eps, t)
    torch.testing.assert_close(target, {"eps": eps, "x0": x0, "v": v}[prediction],
                               rtol=1e-5, atol=1e-5)
    x_t = diffusion.q_sample(x0, t, eps)
    got_x0, got_eps = diffusion.predict_x0_eps(target, x_t, t)
    torch.testing.assert_close(got_x0, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_eps, eps, rtol=1e-5, atol=1e-5)


# --- Samplers against an analytic optimal denoiser -------------------------------------------
# For data x0 ~ N(m, s2) and x_t = a x0 + b eps (a^2 = alpha-bar_t, b^2 = 1 - alpha-bar_t),
# (x0, eps, x_t) are jointly Gaussian, so with D = a^2 s2 + b^2 = Var(x_t):
#     E[eps | x_t] = (b / D) (x_t - a m),     E[x0 | x_t] = m + (a s2 / D) (x_t - a m).
# These are the MSE-optimal outputs of an eps- or x0-model; for v it is a E[eps] - b E[x0].
# Every sampler step is then affine in x_t plus Gaussian noise, so the output is exactly Gaussian
# with a mean and variance that propagate step by step.

T_SAMPLER = 50
DDIM_STEPS = {2: 49, 8: 7, 50: 1}           # steps -> exact spacing of 0..49 (49 = 7 * 7)


def optimal_model(prediction, alphas_cumprod, m, s2):
    """The exact conditional expectation of the prediction target under x0 ~ N(m, s2)."""
    ab = torch.tensor(alphas_cumprod, dtype=torch.float64)

    def model(x_t, t):
        a_bar = ab[t].view(-1, *([1] * (x_t.dim() - 1)))
        a, b = a_bar.sqrt(), (1 - a_bar).sqrt()
        centred, d = x_t.double() - a * m, a_bar * s2 + 1 - a_bar
        eps, x0 = b / d * centred, m + a * s2 / d * centred
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction].to(x_t.dtype)

    return model


def optimal_affine(ab, m, s2):
    """(P, Q, R, S) with E[x0 | x] = P x + Q and E[eps | x] = R x + S, at alpha-bar = ab."""
    a, b, d = math.sqrt(ab), math.sqrt(1 - ab), ab * s2 + 1 - ab
    return a * s2 / d, m - a * s2 / d * a * m, b / d, -b / d * a * m


def exact_ddpm_output(betas, ab, m, s2, variance):
    """Algorithm 2 with the eq. 11 form of the mean, x_{t-1} = (x_t - beta_t / sqrt(1 - alpha-bar_t)
    eps) / sqrt(alpha_t) + sigma_t z, from x_T ~ N(0, 1); sigma_t^2 = beta_t or
    beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t); no noise at the last step."""
    mu, var = 0.0, 1.0
    for i in reversed(range(len(betas))):
        beta = betas[i]
        _, _, R, S = optimal_affine(ab[i], m, s2)
        c = beta / math.sqrt(1 - ab[i])
        A, B = (1 - c * R) / math.sqrt(1 - beta), -c * S / math.sqrt(1 - beta)
        ab_prev = ab[i - 1] if i > 0 else 1.0
        sigma2 = beta if variance == "beta" else beta * (1 - ab_prev) / (1 - ab[i])
        mu, var = A * mu + B, A * A * var + (sigma2 if i > 0 else 0.0)
    return mu, var


def exact_ddim_output(ab, timesteps, m, s2, eta):
    """[Song] eq. 12 from x_T ~ N(0, 1): x_s = sqrt(alpha-bar_s) E[x0] + sqrt(1 - alpha-bar_s -
    sigma^2) E[eps] + sigma z, alpha-bar_s = 1 after the last step. sigma^2 is eta^2 times the
    variance of q(x_s | x_t, x0) (the choice of [Song] eq. 16), found here by Gaussian conditioning
    in precision form: x_s ~ N(., 1 - alpha-bar_s) given x0, and x_t ~ N(sqrt(r) x_s, 1 - r) given
    x_s, with r = alpha-bar_t / alpha-bar_s."""
    mu, var = 0.0, 1.0
    for i, step in enumerate(timesteps):
        ab_t = ab[step]
        ab_s = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        r = ab_t / ab_s
        sigma2 = eta**2 / (1 / (1 - ab_s) + r / (1 - r)) if ab_s < 1 else 0.0
        P, Q, R, S = optimal_affine(ab_t, m, s2)
        c = math.sqrt(1 - ab_s - sigma2)
        A, B = math.sqrt(ab_s) * P + c * R, math.sqrt(ab_s) * Q + c * S
        mu, var = A * mu + B, A * A * var + sigma2
    return mu, var


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddpm beta", "ddpm beta_tilde", "ddim eta=0", "ddim eta=1"])
@settings(max_examples=2)
@given(m=st.floats(-0.5, 0.5), s=st.floats(0.05, 0.5), steps=st.sampled_from(sorted(DDIM_STEPS)))
def test_samplers_match_exact_output_distribution(prediction, sampler, m, s, steps):
    """With the optimal denoiser for x0 ~ N(m, s^2) as the model (clipping off), 100k samples of
    `sample` (both variances) and `ddim_sample` (eta 0 and 1; 2, 8 or 50 evenly spaced steps) have
    the mean and variance of the exact output distribution propagated in float64 (see above),
    within K standard errors. That distribution is not N(m, s^2): fixed variances widen it and
    few DDIM steps narrow it by far more than the tolerance."""
    n, s2 = 100_000, s * s
    betas = short_schedule(T_SAMPLER)
    ab = ref_alphas_cumprod(betas)
    kind, option = sampler.split()
    variance = option if kind == "ddpm" else "beta"
    diffusion = ddpm.GaussianDiffusion(betas, prediction=prediction, variance=variance)
    model = optimal_model(prediction, ab, m, s2)
    if kind == "ddpm":
        x = diffusion.sample(model, (n, 1), generator=seeded(0), clip_denoised=False)
        mu, var = exact_ddpm_output(betas.tolist(), ab, m, s2, variance)
    else:
        eta = float(option.removeprefix("eta="))
        x = diffusion.ddim_sample(model, (n, 1), steps=steps, eta=eta, generator=seeded(0),
                                  clip_denoised=False)
        timesteps = list(range(T_SAMPLER - 1, -1, -DDIM_STEPS[steps]))
        mu, var = exact_ddim_output(ab, timesteps, m, s2, eta)
    assert x.shape == (n, 1)
    assert_gaussian_moments(x, mu, var)


def test_ddim_eta1_all_steps_is_ddpm_with_beta_tilde():
    """[Song] sec. 4.1: DDIM with eta = 1 over all T steps is Algorithm 2 with sigma^2 =
    beta-tilde. Both draw x_T and then one z per step from the generator, so with the same seed
    the two samplers (different formulas for the same update) agree up to float32 rounding over
    T steps (atol 1e-4), with and without clipping."""
    betas = short_schedule(T_SAMPLER)
    model = optimal_model("eps", ref_alphas_cumprod(betas), 0.2, 0.3)
    diffusion = ddpm.GaussianDiffusion(betas, variance="beta_tilde")
    for clip in (False, True):
        ddpm_x = diffusion.sample(model, (1000, 1), seeded(3), clip_denoised=clip)
        ddim_x = diffusion.ddim_sample(model, (1000, 1), steps=T_SAMPLER, eta=1.0,
                                       generator=seeded(3), clip_denoised=clip)
        torch.testing.assert_close(ddim_x, ddpm_x, rtol=0, atol=1e-4)


@given(T=st.integers(1, 300) | st.sampled_from([3229, 4000, 10_000]), frac=st.floats(0, 1))
@example(T=3229, frac=1 - 1 / 3228)        # steps = T - 1: float32 spacing made two equal here
def test_ddim_timesteps_distinct_from_last_to_first(T, frac):
    """ddim_sample calls the model at exactly `steps` distinct timesteps, descending, starting at
    T-1 and (for steps > 1) ending at 0, with one timestep for the whole batch per call."""
    steps = 1 + round(frac * (T - 1))
    seen = []

    def model(x_t, t):
        assert bool((t == t[0]).all())
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)

    diffusion = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(T))
    diffusion.ddim_sample(model, (2, 1), steps=steps, generator=seeded(0))
    assert len(seen) == steps and seen[0] == T - 1
    assert all(a > b for a, b in itertools.pairwise(seen))
    if steps > 1:
        assert seen[-1] == 0


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_p_sample_noise_scale_and_no_noise_at_last_step(variance):
    """Algorithm 2, one step: x_{t-1} = mean + sigma_t z with z the generator's next draw and
    sigma_t^2 = beta_t or beta-tilde_t (float64 reference, rtol 1e-5), except at the last step
    (t = 0), where the output is the mean whatever the generator."""
    betas = short_schedule(T_SAMPLER)
    ab = ref_alphas_cumprod(betas)
    diffusion = ddpm.GaussianDiffusion(betas, variance=variance)
    model = optimal_model("eps", ab, 0.1, 0.2)
    x_t = torch.randn(64, 1, generator=seeded(0))
    for i in (0, 1, 17, T_SAMPLER - 1):
        t = torch.full((64,), i)
        mean = diffusion.p_mean_variance(model, x_t, t)["mean"]
        out = diffusion.p_sample(model, x_t, t, generator=seeded(1))
        if i == 0:
            torch.testing.assert_close(out, mean, rtol=0, atol=0)
            torch.testing.assert_close(diffusion.p_sample(model, x_t, t, seeded(2)), mean)
            continue
        beta = betas[i].item()
        sigma2 = beta if variance == "beta" else beta * (1 - ab[i - 1]) / (1 - ab[i])
        z = torch.randn(64, 1, generator=seeded(1))
        torch.testing.assert_close(out, mean + math.sqrt(sigma2) * z, rtol=1e-5, atol=1e-6)


def test_return_chain_shapes():
    """return_chain gives every state, starting with the initial noise and ending with the
    returned sample: (T + 1, *shape) for `sample`, (steps + 1, *shape) for `ddim_sample`."""
    betas = short_schedule(T_SAMPLER)
    diffusion = ddpm.GaussianDiffusion(betas)
    model = optimal_model("eps", ref_alphas_cumprod(betas), 0.0, 0.5)
    chain = diffusion.sample(model, (3, 2), seeded(0), return_chain=True)
    assert chain.shape == (T_SAMPLER + 1, 3, 2)
    torch.testing.assert_close(chain[0], torch.randn(3, 2, generator=seeded(0)))
    torch.testing.assert_close(chain[-1], diffusion.sample(model, (3, 2), seeded(0)))
    chain = diffusion.ddim_sample(model, (3, 2), steps=4, generator=seeded(0), return_chain=True)
    assert chain.shape == (5, 3, 2)
    torch.testing.assert_close(chain[-1], diffusion.ddim_sample(model, (3, 2), 4,
                                                                generator=seeded(0)))


# --- Variational bound -----------------------------------------------------------------------


def std_normal_cdf(z):
    return 0.5 * math.erfc(-z / math.sqrt(2))


@given(mean=st.floats(-2, 2), log_scale=st.floats(math.log(1e-3), math.log(3)))
def test_discretized_likelihood_is_a_distribution_over_256_bins(mean, log_scale):
    """eq. 13: over the 256 values 2k/255 - 1 the probabilities are the normal mass of each bin
    [x - 1/255, x + 1/255], the edge bins open to -inf and +inf (math.erfc reference, atol 1e-11:
    float64 plus the 1e-12 floor), so they sum to 1 (float64: within 256 * 1e-12; float32:
    within 1e-5) for any mean and scale."""
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean_t, log_scale_t = torch.full_like(x, mean), torch.full_like(x, log_scale)
    p = ddpm.discretized_gaussian_log_likelihood(x, mean_t, log_scale_t).exp()
    scale = math.exp(log_scale)
    edges = [-math.inf] + [(2 * k + 1) / 255 - 1 for k in range(255)] + [math.inf]
    cdf = [std_normal_cdf((e - mean) / scale) for e in edges]
    ref = torch.tensor([hi - lo for lo, hi in itertools.pairwise(cdf)], dtype=torch.float64)
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-11)
    assert abs(p.sum().item() - 1) <= 256e-12
    p32 = ddpm.discretized_gaussian_log_likelihood(x.float(), mean_t.float(),
                                                   log_scale_t.float()).exp()
    assert abs(p32.double().sum().item() - 1) <= 1e-5


gaussian_params = st.tuples(st.floats(-3, 3), st.floats(-3, 3))   # (mean, log-variance)


@given(p=gaussian_params, q=gaussian_params)
def test_normal_kl(p, q):
    """KL(N1 || N2) equals log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2 (float64, rtol
    1e-9), is >= 0 and exactly 0 for equal arguments, and agrees with the Monte Carlo estimate
    E_{x ~ N1}[log N1(x) - log N2(x)] over 100k draws within K standard errors (the sample
    standard deviation of the log-ratio over sqrt(n))."""
    (m1, lv1), (m2, lv2) = p, q
    s1, s2 = math.exp(lv1 / 2), math.exp(lv2 / 2)
    kl = ddpm.normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2)))
    ref = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    assert kl.item() == pytest.approx(ref, rel=1e-9, abs=1e-12) and kl.item() >= 0
    same = torch.tensor([m1, lv1], dtype=torch.float64)
    assert ddpm.normal_kl(same[0], same[1], same[0], same[1]).item() == 0
    x = m1 + s1 * torch.randn(100_000, generator=seeded(0), dtype=torch.float64)
    log_ratio = (math.log(s2 / s1) - 0.5 * ((x - m1) / s1) ** 2 + 0.5 * ((x - m2) / s2) ** 2)
    assert abs(log_ratio.mean().item() - kl.item()) <= K * log_ratio.std().item() / math.sqrt(
        x.numel())


def uniform_8bit(shape, generator):
    """I.i.d. uniform 8-bit data scaled to [-1, 1]: entropy exactly 8 bits per dimension."""
    return torch.randint(0, 256, shape, generator=generator).float() / 127.5 - 1


def affine_model(w, c):
    """A stand-in for any network: output = w x_t + c t."""
    return lambda x_t, t: w * x_t + c * t.float().view(-1, 1)


@given(prediction=st.sampled_from(["eps", "x0", "v"]),
       variance=st.sampled_from(["beta", "beta_tilde"]), w=st.floats(-2, 2), c=st.floats(-0.2, 0.2))
def test_every_bound_term_is_nonnegative(prediction, variance, w, c):
    """eq. 5: L_T and every L_{t-1} are KL divergences and L_0 is minus the log of a probability,
    so each is >= 0, for any model (here affine ones on 8-bit data). Allowed: 1e-6 bits of
    float32 rounding in e^d - 1 - d, the log-variance part of the KL."""
    T = 20
    diffusion = ddpm.GaussianDiffusion(ddpm.cosine_beta_schedule(T), prediction, variance)
    g = seeded(0)
    x0 = uniform_8bit((32, 4), g)
    assert bool((diffusion.prior_bpd(x0) >= 0).all())
    for i in range(T):
        t = torch.full((32,), i)
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        term = diffusion.vb_term_bpd(affine_model(w, c), x0, x_t, t)
        assert term.shape == (32,) and bool((term >= -1e-6).all()), (i, term.min())


@given(x0=st.lists(st.floats(-1, 1), min_size=1, max_size=8))
def test_prior_term_tiny_for_default_linear_schedule(x0):
    """L_T = KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) = (ab x0^2 - ab - log(1 - ab)) / 2 nats with
    ab = alpha-bar_T ~ 4.0e-5 for the default linear schedule: below 3e-5 bits/dim for data in
    [-1, 1], and equal to that float64 value within 2e-7 bits (float32 rounding of 1 - ab)."""
    diffusion = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(1000))
    ab = ref_alphas_cumprod(ddpm.linear_beta_schedule(1000))[-1]
    assert 3.9e-5 < ab < 4.1e-5
    x = torch.tensor([x0])
    ref = sum(ab * v * v - ab - math.log1p(-ab) for v in x0) / (2 * len(x0) * math.log(2))
    got = diffusion.prior_bpd(x).item()
    assert 0 <= got < 3e-5 and abs(got - ref) <= 2e-7


def ref_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) in nats, for variances v1, v2."""
    return 0.5 * (math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def ref_bound_bpd(betas, variance, model_eps, x0, noises):
    """eq. 5 for one sample x0 (a list of 8-bit values on [-1, 1]) in float64, written out from
    the paper: L_T = KL(q(x_T | x0) || N(0, 1)); for t > 1 the KL from q(x_{t-1} | x_t, x0)
    (Gaussian conditioning in precision form) to N(eq. 11 mean, sigma_t^2); L_0 = -log of the
    normal mass of x0's bin (eq. 13) around the eq. 11 mean at t = 1, with sigma_1^2 =
    beta-tilde_2. x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) noises[t]. Bits per dim."""
    ab = ref_alphas_cumprod(torch.tensor(betas, dtype=torch.float64))
    T, D = len(betas), len(x0)
    total = sum(ref_kl(math.sqrt(ab[-1]) * v, 1 - ab[-1], 0.0, 1.0) for v in x0)
    decoder_var = betas[1] * (1 - ab[0]) / (1 - ab[1])
    for i in range(T):
        beta, alpha = betas[i], 1 - betas[i]
        for d, v in enumerate(x0):
            x_t = math.sqrt(ab[i]) * v + math.sqrt(1 - ab[i]) * noises[i][d]
            eps = model_eps(x_t, i)
            mean = (x_t - beta / math.sqrt(1 - ab[i]) * eps) / math.sqrt(alpha)          # eq. 11
            if i == 0:
                sd = math.sqrt(decoder_var)
                lo = -math.inf if v < -0.999 else (v - 1 / 255 - mean) / sd
                hi = math.inf if v > 0.999 else (v + 1 / 255 - mean) / sd
                total -= math.log(std_normal_cdf(hi) - std_normal_cdf(lo))
                continue
            q_var = 1 / (1 / (1 - ab[i - 1]) + alpha / beta)
            q_mean = q_var * (math.sqrt(ab[i - 1]) * v / (1 - ab[i - 1]) + math.sqrt(alpha) * x_t / beta)
            p_var = beta if variance == "beta" else q_var
            total += ref_kl(q_mean, q_var, mean, p_var)
    return total / (D * math.log(2))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@given(w=st.floats(-0.5, 0.5), c=st.floats(-0.05, 0.05))
def test_bits_per_dim_matches_the_bound_written_out_in_float64(variance, w, c):
    """bits_per_dim (L_T + every L_{t-1} + L_0) equals ref_bound_bpd for an affine eps-model on
    8-bit data, edge values included, given the same noise draws (rtol 1e-4: float32)."""
    T, n = 25, 4
    betas = short_schedule(T)
    diffusion = ddpm.GaussianDiffusion(betas, variance=variance)
    x0 = uniform_8bit((n, 3), seeded(0))
    x0[0, 0], x0[1, 1] = -1.0, 1.0
    g = seeded(1)
    noises = [torch.randn(x0.shape, generator=g, dtype=torch.float32) for _ in range(T)]
    got = diffusion.bits_per_dim(affine_model(w, c), x0, generator=seeded(1))
    for k in range(n):
        ref = ref_bound_bpd(betas.tolist(), variance, lambda x_t, i: w * x_t + c * i,
                            x0[k].tolist(), [noise[k].tolist() for noise in noises])
        assert got[k].item() == pytest.approx(ref, rel=1e-4), k


@settings(max_examples=4)
@given(prediction=st.sampled_from(["eps", "x0", "v"]),
       variance=st.sampled_from(["beta", "beta_tilde"]), w=st.floats(-1, 1), c=st.floats(-0.1, 0.1))
def test_no_model_beats_entropy_on_uniform_8bit_data(prediction, variance, w, c):
    """Data with i.i.d. uniform 8-bit values has entropy 8 bits/dim; the bound (eq. 5) is >= the
    model's NLL >= the entropy, for any model. Checked on 512 samples of 16 dims with T = 10, for
    affine models and for the optimal denoiser of the best-fitting Gaussian N(0, 1/3), which gets
    within ~0.3 bits of 8: the mean bits/dim must be >= 8 - K standard errors (sample std of the
    per-sample values / sqrt(512))."""
    T, n = 10, 512
    betas = ddpm.cosine_beta_schedule(T)
    diffusion = ddpm.GaussianDiffusion(betas, prediction, variance)
    x0 = uniform_8bit((n, 16), seeded(0))
    for model in (affine_model(w, c), optimal_model(prediction, ref_alphas_cumprod(betas), 0, 1 / 3)):
        bpd = diffusion.bits_per_dim(model, x0, generator=seeded(1)).double()
        assert bpd.shape == (n,)
        assert bpd.mean().item() >= 8 - K * bpd.std().item() / math.sqrt(n), bpd.mean()


# --- U-Net -----------------------------------------------------------------------------------


def small_unet(in_channels=1, channel_mult=(1, 2), image_size=8, dropout=0.0):
    """A few-thousand-parameter U-Net: the same code paths as the default, fast on a CPU."""
    attn = (image_size // 2 ** (len(channel_mult) - 1),)
    with torch.random.fork_rng(devices=[]):       # the same weights, the global stream untouched
        torch.manual_seed(0)
        return ddpm.UNet(in_channels, base_channels=8, channel_mult=channel_mult,
                         num_res_blocks=1, attn_resolutions=attn, dropout=dropout,
                         image_size=image_size, groups=4)


@settings(max_examples=8)
@given(batch=st.integers(1, 3), channels=st.integers(1, 3), levels=st.integers(1, 3),
       h=st.integers(1, 3), w=st.integers(1, 3))
def test_unet_output_shape_equals_input_shape(batch, channels, levels, h, w):
    """For any batch size, channel count, depth and height/width that are multiples of
    2^(levels - 1) (square or not), model(x, t) has the shape of x."""
    factor = 2 ** (levels - 1)
    model = small_unet(channels, (1, 2, 2)[:levels], image_size=h * factor).eval()
    x = torch.randn(batch, channels, h * factor, w * factor)
    assert model(x, torch.randint(0, 1000, (batch,))).shape == x.shape


def test_unet_samples_are_independent_in_eval_mode():
    """No batch statistics (GroupNorm, not BatchNorm): in eval mode each sample's output is what
    it gets alone, model(x)[i] == model(x[i:i+1]) (atol 1e-5: batched kernels may sum in another
    order)."""
    model = small_unet(2, (1, 2, 2), image_size=12, dropout=0.1).eval()
    x, t = torch.randn(4, 2, 12, 12, generator=seeded(0)), torch.tensor([0, 5, 500, 999])
    out = model(x, t)
    for i in range(4):
        torch.testing.assert_close(out[i : i + 1], model(x[i : i + 1], t[i : i + 1]),
                                   rtol=1e-4, atol=1e-5)


def test_unet_output_depends_on_t():
    """The time embedding reaches the output: the same x at different t gives outputs that differ
    by far more than rounding (relative change > 1e-3 for every pair)."""
    model = small_unet().eval()
    x = torch.randn(1, 1, 8, 8, generator=seeded(0))
    outs = [model(x, torch.tensor([t])) for t in (0, 1, 100, 999)]
    for i, a in enumerate(outs):
        for b in outs[i + 1 :]:
            assert (a - b).norm() > 1e-3 * a.norm()


def test_unet_every_parameter_gets_a_gradient():
    """Back-propagating training_loss reaches every parameter with a finite, non-zero gradient.
    The weights are perturbed first so that a zero-initialised output layer (a common choice)
    cannot hide the gradients behind it."""
    model = small_unet(1, (1, 2, 2), image_size=8, dropout=0.1).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=seeded(1)))
    diffusion = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(100))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        diffusion.training_loss(model, torch.rand(3, 1, 8, 8) * 2 - 1).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert bool(p.grad.isfinite().all()) and bool((p.grad != 0).any()), name


def test_unet_rejects_bad_inputs_with_clear_errors():
    """A size the down/up path cannot take, or a wrong channel count, raises ValueError naming
    the size that works / the expected channels -- not a shape error deep inside a conv."""
    model = small_unet(1, (1, 2, 2), image_size=8).eval()
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"multiples? of 4") as err:
        model(torch.randn(2, 1, 30, 28), t)
    assert "30x28" in str(err.value) and "pad the input to 32x28" in str(err.value)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)") as err:
        model(torch.randn(2, 3, 8, 8), t)
    assert "3" in str(err.value)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(2, 8, 8), t)
    with pytest.raises(ValueError, match=r"divisible by groups"):
        ddpm.UNet(base_channels=12, groups=8)
    with pytest.raises(ValueError, match=r"attn_resolutions"):
        ddpm.UNet(attn_resolutions=(5,))


# --- Training --------------------------------------------------------------------------------

BLOB_MEAN = torch.tensor([0.4, -0.3])
BLOB_SCALE = torch.tensor([[0.25, 0.0], [0.15, 0.08]])   # covariance = BLOB_SCALE BLOB_SCALE^T


def blob(n, generator):
    """The toy data set: an off-centre, anisotropic, correlated 2-D Gaussian blob."""
    return BLOB_MEAN + torch.randn(n, 2, generator=generator) @ BLOB_SCALE.T


def energy_distance(x, y):
    """2 E|X - Y| - E|X - X'| - E|Y - Y'|: zero exactly when the distributions are equal."""
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean()
            - torch.cdist(y, y).mean()).item()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_reduces_loss_and_samples_move_toward_data(prediction):
    """Algorithm 1 end to end: 300 Adam steps of training_loss on the 2-D blob with a small MLP
    (x and t / T in) at least halve the loss on a fixed evaluation batch, and the energy distance
    from 1000 samples (Algorithm 2, T = 50) to the data falls below a fifth of the untrained
    model's. Observed: loss falls 3-25x, distance 14-50x, so the margins are wide."""
    T = 50
    diffusion = ddpm.GaussianDiffusion(short_schedule(T), prediction=prediction)
    g = seeded(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                  torch.nn.SiLU(), torch.nn.Linear(64, 2))

        def model(x_t, t):
            return net(torch.cat([x_t, t[:, None].float() / T], dim=1))

        x0, t, noise = blob(2000, g), torch.randint(0, T, (2000,), generator=g), torch.randn(
            2000, 2, generator=g)
        data = blob(1000, g)

        def evaluate():
            with torch.no_grad():
                loss = diffusion.training_loss(model, x0, t, noise).item()
            return loss, energy_distance(diffusion.sample(model, (1000, 2), seeded(1)), data)

        loss_before, distance_before = evaluate()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(300):
            loss = diffusion.training_loss(model, blob(256, g))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        loss_after, distance_after = evaluate()
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert distance_after < 0.2 * distance_before, (distance_before, distance_after)


# --- Bad inputs ------------------------------------------------------------------------------


@given(T=st.integers(1, 100), bad=st.sampled_from(["T", "T+7", "-1"]))
def test_timesteps_out_of_range_are_rejected(T, bad):
    """t outside 0..T-1 raises ValueError stating the valid range, from every method that takes
    t (one out-of-range entry in an otherwise valid batch is enough)."""
    diffusion = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(T))
    x = torch.zeros(3, 2)
    t = torch.tensor([0, 0, {"T": T, "T+7": T + 7, "-1": -1}[bad]])
    model = affine_model(0.5, 0.0)
    calls = [lambda: diffusion.q_sample(x, t), lambda: diffusion.q_mean_variance(x, t),
             lambda: diffusion.q_posterior_mean_variance(x, x, t),
             lambda: diffusion.p_sample(model, x, t), lambda: diffusion.training_loss(model, x, t),
             lambda: diffusion.vb_term_bpd(model, x, x, t)]
    for call in calls:
        with pytest.raises(ValueError, match=rf"0\.\.{T - 1}"):
            call()


def test_timesteps_of_wrong_dtype_or_shape_are_rejected():
    """t must be an integer tensor with one entry per batch element; anything else is a
    ValueError that says so and shows what was given."""
    diffusion = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(10))
    x = torch.zeros(3, 2)
    for t, shown in [(torch.zeros(3), "float32"), (torch.zeros(3, dtype=torch.bool), "bool"),
                     (torch.zeros(2, dtype=torch.long), r"\(2,\)"),
                     (torch.zeros(3, 1, dtype=torch.long), r"\(3, 1\)"),
                     (torch.tensor(0), r"\(\)")]:
        with pytest.raises(ValueError, match=r"integer tensor of shape \(3,\)") as err:
            diffusion.q_sample(x, t)
        assert err.match(shown)


def test_non_float_or_unbatched_data_is_rejected():
    """x0 (and x_t) must be floating-point and shaped (batch, ...): integer data, a 1-D tensor
    or a list raise ValueError naming what was given."""
    diffusion = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(10))
    t = torch.zeros(3, dtype=torch.long)
    model = affine_model(0.5, 0.0)
    for call, shown in [(lambda: diffusion.q_sample(torch.zeros(3, 2, dtype=torch.uint8), t),
                         "uint8"),
                        (lambda: diffusion.training_loss(model, torch.zeros(3, dtype=torch.long)),
                         "int64"),
                        (lambda: diffusion.q_mean_variance(torch.zeros(3), t), r"\(3,\)"),
                        (lambda: diffusion.p_mean_variance(model, [[0.0]] * 3, t), "list")]:
        with pytest.raises(ValueError, match=r"floating-point tensor shaped \(batch, \.\.\.\)") as err:
            call()
        assert err.match(shown)


@pytest.mark.parametrize("make, message", [
    (lambda: ddpm.linear_beta_schedule(0), r"T must be an integer >= 1, got 0"),
    (lambda: ddpm.linear_beta_schedule(10.0), r"T must be an integer >= 1, got 10\.0"),
    (lambda: ddpm.cosine_beta_schedule(-3), r"T must be an integer >= 1, got -3"),
    (lambda: ddpm.cosine_beta_schedule(True), r"T must be an integer >= 1, got True"),
    (lambda: ddpm.linear_beta_schedule(10, 0.0, 0.02), r"0 < beta_start <= beta_end <= 1"),
    (lambda: ddpm.linear_beta_schedule(10, 0.03, 0.02), r"0 < beta_start <= beta_end <= 1"),
    (lambda: ddpm.linear_beta_schedule(10, 1e-4, 1.5), r"0 < beta_start <= beta_end <= 1.*1\.5"),
    (lambda: ddpm.linear_beta_schedule(10, float("nan")), r"0 < beta_start"),
    (lambda: ddpm.cosine_beta_schedule(10, s=-0.1), r"s >= 0.*s=-0\.1"),
    (lambda: ddpm.cosine_beta_schedule(10, max_beta=0.0), r"0 < max_beta <= 1.*max_beta=0\.0"),
    (lambda: ddpm.cosine_beta_schedule(10, max_beta=1.2), r"max_beta=1\.2"),
    (lambda: ddpm.GaussianDiffusion(torch.full((2, 3), 0.1)), r"1-D.*\(2, 3\)"),
    (lambda: ddpm.GaussianDiffusion(torch.tensor([])), r"non-empty"),
    (lambda: ddpm.GaussianDiffusion(torch.tensor([0.1, 0.0])), r"\(0, 1\]"),
    (lambda: ddpm.GaussianDiffusion(torch.tensor([0.1, 1.5])), r"\(0, 1\]"),
    (lambda: ddpm.GaussianDiffusion(torch.tensor([0.1, float("nan")])), r"\(0, 1\]"),
    (lambda: ddpm.GaussianDiffusion(ddpm.cosine_beta_schedule(10, max_beta=1.0)),
     r"alpha-bar_T is 0.*max_beta=0\.999"),
    (lambda: ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(1000, 1e-4, 0.3)),
     r"alpha-bar_T is 0"),                          # underflows in float32 without a beta of 1
    (lambda: ddpm.GaussianDiffusion([0.1], prediction="epsilon"), r'"eps", "x0" or "v".*epsilon'),
    (lambda: ddpm.GaussianDiffusion([0.1], variance="large"), r'"beta" or "beta_tilde".*large'),
])
def test_invalid_schedule_and_diffusion_arguments(make, message):
    """Invalid schedule and diffusion arguments raise ValueError saying what is required and,
    where there is one, what was given."""
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("steps, eta, message", [
    (0, 0.0, r"steps must be an integer in 1\.\.20, got 0"),
    (21, 0.0, r"steps must be an integer in 1\.\.20, got 21"),
    (2.0, 0.0, r"steps must be an integer in 1\.\.20, got 2\.0"),
    (5, -0.5, r"eta must lie in \[0, 1\], got -0\.5"),
    (5, 1.5, r"eta must lie in \[0, 1\], got 1\.5"),
])
def test_invalid_ddim_arguments(steps, eta, message):
    """ddim_sample rejects a step count outside 1..T, a non-integer one and eta outside [0, 1]."""
    diffusion = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(20))
    with pytest.raises(ValueError, match=message):
        diffusion.ddim_sample(affine_model(0.0, 0.0), (2, 1), steps=steps, eta=eta)


def test_model_output_of_wrong_shape_is_rejected():
    """A model whose output is not shaped like x_t gets a ValueError showing both shapes."""
    diffusion = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(10))
    with pytest.raises(ValueError, match=r"\(4, 1\) != input shape \(4, 2\)"):
        diffusion.sample(lambda x_t, t: x_t[:, :1], (4, 2))
    with pytest.raises(ValueError, match=r"\(4, 1\) != input shape \(4, 2\)"):   # not broadcast
        diffusion.training_loss(lambda x_t, t: x_t[:, :1], torch.zeros(4, 2))


# --- The README's example --------------------------------------------------------------------


def test_readme_example_learns_the_ring():
    """The copy-into-your-project example in README.md runs as printed, and its samples (both
    samplers) lie near the ring of radius 0.8 it trains on. Observed: radius 0.83 +- 0.06
    (Algorithm 2) and 0.80 +- 0.07 (DDIM, 20 steps)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
        code = f.read().split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    with torch.random.fork_rng():
        exec(code, namespace)                             # noqa: S102 -- the README's own code
    for points in (namespace["points"], namespace["fast"]):
        radius = points.norm(dim=1)
        assert abs(radius.mean().item() - 0.8) < 0.1 and radius.std().item() < 0.15
