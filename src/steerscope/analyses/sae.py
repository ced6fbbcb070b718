"""A compact TopK sparse autoencoder, its metrics, and feature-separation statistics.

Algorithm (TopK SAE, Gao et al. 2024, arXiv 2406.04093; Makhzani & Frey 2013):
    1. Inputs x [n d] are centred by a learned decoder bias b_dec (initialised at the data mean)
       and divided by one scale c (the root mean squared norm of x - mean, fixed from the data),
       so that the learning rate does not depend on the residual norm.
    2. Encoder: a = ReLU(W_enc ((x - b_dec)/c) + b_enc); only the k largest entries of a per row
       are kept (z = TopK(a)); L0 is therefore at most k.
    3. Decoder: x̂ = c · W_dec z + b_dec, with every decoder row (feature direction) kept at unit
       norm after each step; W_enc is initialised as W_decᵀ.
    4. Loss: mean squared error of the scaled reconstruction; Adam; minibatches drawn from a
       ``torch.Generator`` seeded by ``seed``, so training is deterministic for a seed.
    5. Reported: fraction of variance explained FVE = 1 - Σ‖x - x̂‖² / Σ‖x - mean x‖², and mean L0.

The library sae-lens was not used: it pulls in TransformerLens (which re-implements the model)
and ~45 other packages; this module is what the reasoning study needs, on Hugging Face models.
DiffSAE (Sinii et al. 2025) is the same SAE trained on h_steered - h_unsteered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerscope.errors import SAEError as SAEError  # defined in errors.py; re-exported


@dataclass(frozen=True)
class SAEConfig:
    """Training settings of :func:`train_sae` (width = number of features, k = active per row)."""

    width: int = 1024
    k: int = 16
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0


class TopKSAE(torch.nn.Module):
    """x ↦ x̂ = c·W_dec TopK(ReLU(W_enc (x - b_dec)/c + b_enc)) + b_dec.

    Args:
        d: input width (d_model).
        width: number of features.
        k: active features per input.
        scale: the fixed input scale c.
        generator: seeds the initialisation.

    Example:
        >>> sae = TopKSAE(576, 1024, 16)
        >>> z = sae.encode(x)           # [n 1024], at most 16 non-zeros per row
    """

    def __init__(self, d: int, width: int, k: int, scale: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0 < k <= width:
            raise SAEError(f"k = {k} must be between 1 and the width {width}")
        w = torch.randn(width, d, generator=generator)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)  # [width d], unit rows = feature directions
        self.W_enc = torch.nn.Parameter(w.T.clone())  # [d width]
        self.b_enc = torch.nn.Parameter(torch.zeros(width))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.k = k
        self.scale = float(scale)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations ReLU(W_enc (x - b_dec)/c + b_enc) [n width]."""
        return torch.relu(((x - self.b_dec) / self.scale) @ self.W_enc + self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse codes [n width] (the k largest pre-activations per row, others zero)."""
        a = self.pre(x)
        v, i = a.topk(self.k, dim=-1)
        return torch.zeros_like(a).scatter(-1, i, v)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction [n d] from codes [n width]."""
        return self.scale * (z @ self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (the encoder is left as is)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


@dataclass(frozen=True)
class SAEFit:
    """A trained SAE and its metrics on the data it was evaluated on."""

    sae: TopKSAE
    fve: float
    l0: float
    dead_fraction: float
    final_loss: float


def train_sae(x: torch.Tensor, config: SAEConfig = SAEConfig()) -> SAEFit:
    """Train a :class:`TopKSAE` on rows of ``x`` [n d] (float32, CPU or GPU).

    Returns:
        the SAE with FVE, mean L0 and the fraction of features never active, measured on ``x``.

    Example:
        >>> fit = train_sae(acts, SAEConfig(width=512, k=8, steps=500))
        >>> fit.fve, fit.l0
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise SAEError(f"give a [n d] matrix with n >= 2 rows; got shape {tuple(x.shape)}")
    x = x.float()
    g = torch.Generator().manual_seed(config.seed)
    mean = x.mean(0)
    scale = float((x - mean).pow(2).sum(-1).mean().sqrt().clamp_min(1e-8))
    sae = TopKSAE(x.shape[1], config.width, config.k, scale, g).to(x.device)
    with torch.no_grad():
        sae.b_dec.copy_(mean)
    opt = torch.optim.Adam(sae.parameters(), lr=config.lr)
    loss = torch.tensor(0.0)
    for _ in range(config.steps):
        idx = torch.randint(0, x.shape[0], (min(config.batch_size, x.shape[0]),), generator=g).to(x.device)
        xb = x[idx]
        loss = ((sae(xb) - xb) / scale).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.normalize_decoder()
    fve, l0, dead = sae_metrics(sae, x)
    return SAEFit(sae, fve, l0, dead, float(loss.detach()))


@torch.no_grad()
def sae_metrics(sae: TopKSAE, x: torch.Tensor, batch: int = 4096) -> tuple[float, float, float]:
    """(FVE, mean L0, fraction of features never active) of ``sae`` on ``x`` [n d]."""
    err, l0, n = 0.0, 0.0, x.shape[0]
    active = torch.zeros(sae.W_dec.shape[0], dtype=torch.bool, device=x.device)
    for i in range(0, n, batch):
        xb = x[i : i + batch].float()
        z = sae.encode(xb)
        err += float((sae.decode(z) - xb).pow(2).sum())
        l0 += float((z > 0).sum())
        active |= (z > 0).any(0)
    tot = float((x.float() - x.float().mean(0)).pow(2).sum())
    return 1.0 - err / max(tot, 1e-12), l0 / n, float((~active).float().mean())


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of each column of ``scores`` [n f] for 0/1 ``labels`` [n] (ties count ½).

    Computed as the Mann-Whitney U statistic from average ranks; returns [f].

    Example:
        >>> auroc(torch.tensor([[0.1], [0.9]]), torch.tensor([0, 1]))
        tensor([1.])
    """
    if scores.ndim == 1:
        scores = scores[:, None]
    y = labels.bool()
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise SAEError("AUROC needs both classes among the labels")
    ranks = _average_ranks(scores.double())
    return ((ranks[y.cpu()].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)).float()


def _average_ranks(s: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n per column with ties given their average rank (scipy.stats.rankdata)."""
    from scipy.stats import rankdata

    return torch.from_numpy(rankdata(s.cpu().numpy(), axis=0)).to(s.dtype)


def max_abs_cosine(directions: torch.Tensor, v: torch.Tensor) -> tuple[float, int]:
    """The largest |cos(direction_j, v)| over rows of ``directions`` [f d] and its row index."""
    c = torch.nn.functional.cosine_similarity(directions.float(), v.float()[None], dim=-1).abs()
    j = int(c.argmax())
    return float(c[j]), j
