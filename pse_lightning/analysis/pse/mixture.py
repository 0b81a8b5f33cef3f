"""How many modes has the PSE ratio r? Gaussian mixtures fitted to a fine histogram of r.

Claim 1 of Xu et al. (2019) says perturbations are of *three* types. Thresholds cut any
continuous r into three bins, so the thresholded shares cannot test that; the shape of r
can (docs/METHODS.md §2.6). The analysis keeps a fixed-size histogram of r (``MIX_BINS``
equal bins of [0, 1], reduced by sum, so memory is flat) and fits Gaussian mixtures with
k = 1..``MAX_COMPONENTS`` components to the *binned* counts by EM for grouped data
(McLachlan & Jones 1988): each count is the mixture's probability of its bin, with the two
end bins open (r <= 1/B and r >= 1 - 1/B are censored), so a point mass of r at 0 or 1 cannot
make the likelihood unbounded. BIC picks k; a parametric-bootstrap likelihood-ratio test of k
against k + 1 components (McLachlan 1987) gives a calibrated p (the LR statistic has no
chi-square limit for mixtures).

Everything is batched over replicates: a tensor of histograms (R, B) is fitted at once, which
makes the bootstrap and its calibration tests affordable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Generator, Tensor

MIX_BINS = 100
MAX_COMPONENTS = 4
# Fewer images with a defined r than this: no mixture is fitted (NaN, k = 0).
MIN_MIXTURE_IMAGES = 20
_ITERS = 200
_TOL = 1e-7  # stop when no replicate's log-likelihood rises by more than this per 25 steps
_MIN_SD = 1e-3  # numerical floor (a tenth of a bin); the binned likelihood is bounded anyway
_TINY = 1e-300


def fine_histogram(r: Tensor, bins: int = MIX_BINS) -> Tensor:
    """Counts (bins,) of the defined r in equal bins of [0, 1] (r = 1 in the last; NaN out)."""
    r = r[~torch.isnan(r)].double()
    return torch.bincount((r * bins).long().clamp(0, bins - 1), minlength=bins)


@dataclass
class MixtureFit:
    """Fitted mixtures, one per histogram (leading dim R).

    Attributes:
        weights, means, sds: (R, k).
        loglik: (R,) binned log-likelihood sum_b n_b log P_b.
    """

    weights: Tensor
    means: Tensor
    sds: Tensor
    loglik: Tensor

    def density(self, x: Tensor) -> Tensor:
        """Mixture density (R, len(x)) at the points x."""
        z = (x[None, :, None] - self.means[:, None, :]) / self.sds[:, None, :]
        pdf = torch.exp(-0.5 * z**2) / (math.sqrt(2 * math.pi) * self.sds[:, None, :])
        return (self.weights[:, None, :] * pdf).sum(-1)


def _edges(bins: int) -> tuple[Tensor, Tensor]:
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    lo, hi = edges[:-1].clone(), edges[1:].clone()
    lo[0], hi[-1] = -math.inf, math.inf
    return lo, hi


def _bin_probabilities(lo: Tensor, hi: Tensor, mu: Tensor, sd: Tensor):
    """Per row, bin and component: standardised edges a, b and Z = P(a < X <= b)."""
    a = (lo[None, :, None] - mu[:, None, :]) / sd[:, None, :]
    b = (hi[None, :, None] - mu[:, None, :]) / sd[:, None, :]
    # the upper tail from the complement keeps its precision
    upper = torch.special.ndtr(-a) - torch.special.ndtr(-b)
    lower = torch.special.ndtr(b) - torch.special.ndtr(a)
    return a, b, torch.where(a > 0, upper, lower).clamp_min(0)


def _loglik(counts: Tensor, w: Tensor, mu: Tensor, sd: Tensor, lo: Tensor, hi: Tensor):
    _, _, z = _bin_probabilities(lo, hi, mu, sd)
    joint = w[:, None, :] * z
    prob = joint.sum(-1)
    return (counts * prob.clamp_min(_TINY).log()).sum(-1), joint, prob


def _em(counts: Tensor, w: Tensor, mu: Tensor, sd: Tensor, iters: int) -> MixtureFit:
    """EM for grouped data from the given starts; counts (N, B), parameters (N, k)."""
    lo, hi = _edges(counts.shape[1])
    mid = ((lo.clamp_min(0) + hi.clamp_max(1)) / 2)[None, :, None]
    n = counts.sum(-1, keepdim=True).clamp_min(1)
    previous = torch.full((len(counts),), -math.inf, dtype=torch.float64)
    for step in range(iters):
        a, b, z = _bin_probabilities(lo, hi, mu, sd)
        joint = w[:, None, :] * z
        prob = joint.sum(-1, keepdim=True)
        resp = joint / prob.clamp_min(_TINY) * counts[:, :, None]  # expected counts (N, B, k)
        phi_a = torch.where(a.isfinite(), torch.exp(-0.5 * a**2), 0.0) / math.sqrt(2 * math.pi)
        phi_b = torch.where(b.isfinite(), torch.exp(-0.5 * b**2), 0.0) / math.sqrt(2 * math.pi)
        a_phi = torch.where(a.isfinite(), a * phi_a, 0.0)
        b_phi = torch.where(b.isfinite(), b * phi_b, 0.0)
        ok = z > 1e-12
        zs = z.clamp_min(1e-12)
        m1 = torch.where(ok, (phi_a - phi_b) / zs, 0.0)
        m2 = torch.where(ok, 1 + (a_phi - b_phi) / zs, 0.0)
        # where the component puts ~no mass in the bin, the bin's midpoint stands in
        ex = torch.where(ok, mu[:, None, :] + sd[:, None, :] * m1, mid)
        var_in = torch.where(ok, sd[:, None, :] ** 2 * (m2 - m1**2), 0.0).clamp_min(0)
        nk = resp.sum(1)
        w = nk / n
        mu = (resp * ex).sum(1) / nk.clamp_min(1e-10)
        var = (resp * (var_in + (ex - mu[:, None, :]) ** 2)).sum(1) / nk.clamp_min(1e-10)
        sd = var.sqrt().clamp_min(_MIN_SD)
        if step % 25 == 24:
            current = _loglik(counts, w, mu, sd, lo, hi)[0]
            if bool(((current - previous).abs() < _TOL).all()):
                break
            previous = current
    return MixtureFit(w, mu, sd, _loglik(counts, w, mu, sd, lo, hi)[0])


def _quantiles(counts: Tensor, u: Tensor) -> Tensor:
    """Histogram quantiles (N, m) at levels u (N, m), bin midpoints."""
    cdf = counts.cumsum(-1) / counts.sum(-1, keepdim=True).clamp_min(1)
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp_max(counts.shape[1] - 1)
    return (idx.double() + 0.5) / counts.shape[1]


def _moments(counts: Tensor) -> tuple[Tensor, Tensor]:
    x = (torch.arange(counts.shape[1], dtype=torch.float64) + 0.5) / counts.shape[1]
    n = counts.sum(-1).clamp_min(1)
    mean = (counts * x).sum(-1) / n
    sd = ((counts * (x - mean[:, None]) ** 2).sum(-1) / n).sqrt()
    return mean, sd.clamp_min(_MIN_SD)


def fit_mixture(
    counts: Tensor,
    k: int,
    *,
    starts: int = 2,
    gen: Generator | None = None,
    init: MixtureFit | None = None,
    iters: int = _ITERS,
) -> MixtureFit:
    """The best of several EM runs of a k-component mixture per histogram.

    Starts: the k equal-mass slices of the histogram (means and a shared sd), ``starts``
    random quantile starts, and, given ``init`` (a fit with k - 1 components), that fit with
    its heaviest component split in two, so the k-component fit is never worse than it.

    Args:
        counts: (R, B) histograms on [0, 1] (or (B,), one histogram).
        k: components, >= 1.
        gen: generator of the random starts.

    Returns:
        :class:`MixtureFit` with leading dim R (1 for a single histogram).
    """
    counts = counts.double().reshape(-1, counts.shape[-1])
    r = len(counts)
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    _, overall_sd = _moments(counts)
    levels = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    inits = [_quantiles(counts, levels.expand(r, k))]
    for _ in range(starts):
        u = torch.rand(r, k, generator=gen, dtype=torch.float64).sort(-1).values
        inits.append(_quantiles(counts, u))
    mus = torch.stack(inits)  # (S, R, k)
    sds = (overall_sd / k)[None, :, None].expand_as(mus)
    ws = torch.full_like(mus, 1 / k)
    if init is not None and k > 1:
        heavy = init.weights.argmax(-1, keepdim=True)
        h_mu, h_sd = init.means.gather(-1, heavy), init.sds.gather(-1, heavy)
        h_w = init.weights.gather(-1, heavy)
        keep = torch.ones_like(init.weights, dtype=torch.bool).scatter(-1, heavy, False)
        rest = lambda t: t[keep].reshape(r, k - 2)  # noqa: E731
        split_mu = torch.cat([rest(init.means), h_mu - h_sd / 2, h_mu + h_sd / 2], -1)
        split_sd = torch.cat([rest(init.sds), h_sd, h_sd], -1).clamp_min(_MIN_SD)
        split_w = torch.cat([rest(init.weights), h_w / 2, h_w / 2], -1)
        mus, sds = torch.cat([mus, split_mu[None]]), torch.cat([sds, split_sd[None]])
        ws = torch.cat([ws, split_w[None]])
    s = len(mus)
    flat = lambda t: t.reshape(s * r, k)  # noqa: E731
    fit = _em(counts.repeat(s, 1), flat(ws), flat(mus), flat(sds), iters)
    best = fit.loglik.reshape(s, r).argmax(0)
    pick = lambda t: t.reshape(s, r, -1)[best, torch.arange(r)]  # noqa: E731
    return MixtureFit(pick(fit.weights), pick(fit.means), pick(fit.sds),
                      fit.loglik.reshape(s, r)[best, torch.arange(r)])  # fmt: skip


def bic(fit: MixtureFit, n: Tensor | float) -> Tensor:
    """BIC = -2 loglik + (3k - 1) log n (k weights summing to 1, k means, k sds)."""
    k = fit.weights.shape[-1]
    n = torch.as_tensor(n, dtype=torch.float64)
    return -2 * fit.loglik + (3 * k - 1) * n.clamp_min(1).log()


def sample_histograms(fit: MixtureFit, n: int, replicates: int, gen: Generator) -> Tensor:
    """(replicates, MIX_BINS) histograms of n draws from the first mixture of ``fit``,
    binned like the data (values beyond [0, 1] land in the open end bins)."""
    comp = torch.multinomial(fit.weights[0], replicates * n, replacement=True, generator=gen)
    x = fit.means[0][comp] + fit.sds[0][comp] * torch.randn(
        replicates * n, generator=gen, dtype=torch.float64
    )
    bins = (x * MIX_BINS).floor().clamp(0, MIX_BINS - 1).long()
    rows = torch.arange(replicates).repeat_interleave(n)
    out = torch.zeros(replicates, MIX_BINS, dtype=torch.float64)
    return out.index_put_((rows, bins), torch.ones(len(bins), dtype=torch.float64),
                          accumulate=True)  # fmt: skip


def lr_statistic(counts: Tensor, k: int, gen: Generator) -> tuple[Tensor, MixtureFit]:
    """2 (loglik_{k+1} - loglik_k) per histogram (R,), and the k-component fits."""
    small = fit_mixture(counts, k, gen=gen)
    large = fit_mixture(counts, k + 1, gen=gen, init=small)
    return (2 * (large.loglik - small.loglik)).clamp_min(0), small


def bootstrap_lrt(counts: Tensor, k: int, replicates: int, gen: Generator) -> Tensor:
    """Parametric-bootstrap p of H0: k components against k + 1, for one histogram (B,).

    p = (1 + #{T* >= T}) / (replicates + 1), T* from histograms of n draws from the fitted
    k-component mixture, each refitted with k and k + 1 components like the data.
    """
    counts = counts.double().reshape(1, -1)
    stat, null = lr_statistic(counts, k, gen)
    boot = sample_histograms(null, int(counts.sum()), replicates, gen)
    stat_boot, _ = lr_statistic(boot, k, gen)
    exceed = (stat_boot >= stat[0] - 1e-9).sum().double()
    return (1 + exceed) / (replicates + 1)


@dataclass
class Modes:
    """The mixture analysis of one histogram of r.

    Attributes:
        bic: (MAX_COMPONENTS,) BIC of k = 1.. components (NaN when too few images).
        k: the k of the smallest BIC (0 when not fitted).
        p: {k: p of the bootstrap test of k against k + 1} for k = 1, 2.
        fit: the fitted mixture with ``k`` components (None when not fitted).
    """

    bic: Tensor
    k: int
    p: dict[int, Tensor]
    fit: MixtureFit | None


def modes(counts: Tensor, *, replicates: int = 99, seed: int = 0) -> Modes:
    """BIC over 1..MAX_COMPONENTS components and the bootstrap LR tests 1 vs 2, 2 vs 3."""
    counts = counts.double().reshape(1, -1)
    n = float(counts.sum())
    nan = torch.tensor(math.nan, dtype=torch.float64)
    if n < MIN_MIXTURE_IMAGES:
        return Modes(torch.full((MAX_COMPONENTS,), math.nan, dtype=torch.float64), 0,
                     {1: nan, 2: nan}, None)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    fits: list[MixtureFit] = []
    for k in range(1, MAX_COMPONENTS + 1):
        fits.append(fit_mixture(counts, k, gen=gen, init=fits[-1] if fits else None))
    bics = torch.cat([bic(f, n) for f in fits])
    k = int(bics.argmin()) + 1
    p = {j: bootstrap_lrt(counts, j, replicates, gen) if replicates > 0 else nan for j in (1, 2)}
    return Modes(bics, k, p, fits[k - 1])
