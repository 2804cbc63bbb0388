"""`vqvae`: the vector-quantised autoencoder (van den Oord, Vinyals & Kavukcuoglu, 2017, "Neural Discrete
Representation Learning"). The encoder's output is cut into positions of `embedding_dim` numbers; each
position is replaced by its nearest entry of a codebook of `codebook_size` entries, and the decoder reads
the entries. The gradient skips the quantisation (straight-through estimator); the loss is the
reconstruction plus `commitment` x ||z_e - sg(e)||^2; the codebook follows the encoder outputs assigned to
it by exponential moving averages (the paper's appendix A.1), not by gradients.

`linear`: the shared MLP's latent_dim outputs make latent_dim / embedding_dim positions. `conv`: the
shared strided convolutions end in a grid (7 x 7 for two of them), and a 1x1 convolution gives each grid
point embedding_dim numbers, so latent_dim = grid points x embedding_dim.

Samples come from independent categoricals per position fitted to the training images' codes (ex post).
The code (what the probe and k-NN read) is the chosen entries, flattened position by position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.config import ConfigError, integer, number
from pipeline.models.contract import Autoencoder, Capabilities, ModelOutput, descend
from pipeline.models.networks import build_networks, conv_sides

if TYPE_CHECKING:
    from pipeline.config import CellConfig

SMOOTHING = 1e-5  # Laplace smoothing of the EMA cluster sizes, so an unused entry never divides by zero


@dataclass(frozen=True)
class VQVAESettings:
    codebook_size: int = 256  # entries of the codebook
    commitment: float = 0.25  # weight of ||z_e - sg(e)||^2, which keeps the encoder near its entries
    embedding_dim: int = 2  # numbers per code position (per entry)
    decay: float = 0.99  # of the codebook's exponential moving averages

    def label(self) -> str:
        return f"K={self.codebook_size}, d={self.embedding_dim}, β={self.commitment:g}, γ={self.decay:g}"


def nearest_entries(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the codebook entry (K, D) nearest in Euclidean distance to each vector (M, D)."""
    distances = vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codebook.T + codebook.pow(2).sum(1)
    return distances.argmin(1)


def perplexity(counts: torch.Tensor) -> float:
    """exp of the entropy of the distribution the counts give (0 log 0 = 0): K when K entries are used equally."""
    p = counts / counts.sum()
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())


class PositionCategoricals(nn.Module):
    """Independent categoricals over the codebook, one per position, fitted to the training codes' entries.
    Its noise is uniform in [0, 1) per position; an entry is drawn by inverting each position's CDF."""

    label = "ex-post categoricals per position"
    ex_post = True

    def __init__(self, positions: int, codebook_size: int):
        super().__init__()
        self.positions = positions
        self.register_buffer("probabilities", torch.full((positions, codebook_size), 1.0 / codebook_size))

    def noise(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(count, self.positions, generator=generator)

    def entries(self, noise: torch.Tensor) -> torch.Tensor:
        """The entry index (count, positions) each position's uniform noise selects."""
        cumulative = self.probabilities.cumsum(1)
        cumulative = cumulative / cumulative[:, -1:]  # ends at exactly 1: no draw falls past the last used entry
        picked = torch.searchsorted(cumulative, noise.T.contiguous().to(cumulative.dtype), right=True).T
        return picked.clamp_max(self.probabilities.shape[1] - 1)

    @torch.no_grad()
    def fit(self, entries: torch.Tensor) -> None:
        """Each position's share of each entry among the training codes' entries (N, positions)."""
        counts = torch.zeros_like(self.probabilities).scatter_add_(
            1, entries.T, torch.ones(entries.T.shape, dtype=self.probabilities.dtype, device=entries.device)
        )
        self.probabilities.copy_(counts / len(entries))


class GridToCode(nn.Module):
    """(N, D, side, side) feature grid to the flat code (N, side * side * D), position by position."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.permute(0, 2, 3, 1).flatten(1)


class CodeToGrid(nn.Module):
    """The flat code (N, side * side * D) back to the grid (N, D, side, side)."""

    def __init__(self, side: int, embedding_dim: int):
        super().__init__()
        self.side, self.embedding_dim = side, embedding_dim

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return code.view(-1, self.side, self.side, self.embedding_dim).permute(0, 3, 1, 2)


class VQVAE(Autoencoder):
    family = "vqvae"
    capabilities = Capabilities(posterior=False, likelihood_bound=False, continuous_code=False)
    Settings = VQVAESettings
    Sampler = PositionCategoricals
    OWN_METRICS = {
        "codebook_perplexity": "exp of the entropy of the codebook entries' use over every position of the test "
        "images (the codebook size when all entries are used equally often)",
        "dead_codes": "share of the codebook's entries that no position of any test image uses",
    }

    def __init__(self, cell: CellConfig):
        super().__init__(cell)
        size, dim = self.settings.codebook_size, self.settings.embedding_dim
        self.register_buffer("codebook", torch.randn(size, dim))
        # The moving averages start as if each entry had been assigned one vector, itself: an entry no batch
        # uses keeps its place at first (rather than being divided by the smoothing constant), then drifts
        # towards the origin as both of its averages decay (to half its distance after about 1,150 steps).
        self.register_buffer("cluster_size", torch.ones(size))  # EMA of the number of vectors assigned to each entry
        self.register_buffer("entry_sum", self.codebook.clone())  # EMA of their sum
        self.register_buffer("initialised", torch.tensor(False))  # the codebook was set from the first batch
        self.known_initialised = False  # the buffer read once on the host, not at every batch (a GPU sync)

    @staticmethod
    def parse_settings(raw: dict, where: str) -> VQVAESettings:
        defaults = VQVAESettings()
        decay = number(raw.get("decay", defaults.decay), f"{where}.decay", low=0.0)
        if decay >= 1:
            raise ConfigError(f"{where}.decay must be below 1 (1 never moves the codebook), got {decay}")
        return VQVAESettings(
            codebook_size=integer(raw.get("codebook_size", defaults.codebook_size), f"{where}.codebook_size", low=2),
            commitment=number(raw.get("commitment", defaults.commitment), f"{where}.commitment", low=0.0),
            embedding_dim=integer(raw.get("embedding_dim", defaults.embedding_dim), f"{where}.embedding_dim", low=1),
            decay=decay,
        )

    @classmethod
    def check_cell(cls, cell: CellConfig, train_images: int) -> None:
        dim = cell.settings.embedding_dim
        if cell.arch == "conv":
            side = conv_sides(cell.channels)[-1]
            if cell.latent_dim != side * side * dim:
                raise ConfigError(
                    f"cells.{cell.name}.latent_dim = {cell.latent_dim}: a conv {cls.family} codes a {side}x{side} grid "
                    f"of positions with embedding_dim = {dim} numbers each; set latent_dim: {side * side * dim}"
                )
        elif cell.latent_dim % dim:
            raise ConfigError(
                f"cells.{cell.name}.latent_dim = {cell.latent_dim} does not divide into positions of embedding_dim = "
                f"{dim} numbers; set latent_dim to a multiple of {dim} or change embedding_dim"
            )

    def make_sampler(self, cell: CellConfig) -> PositionCategoricals:
        return PositionCategoricals(cell.latent_dim // cell.settings.embedding_dim, cell.settings.codebook_size)

    def networks(self, cell: CellConfig) -> tuple[nn.Module, nn.Module]:
        if cell.arch != "conv":
            return super().networks(cell)
        dim, side = cell.settings.embedding_dim, conv_sides(cell.channels)[-1]
        encoder, decoder = build_networks("conv", cell.latent_dim, cell.latent_dim, cell.hidden, cell.channels)
        # The shared networks without their flat bottleneck (the encoder's Flatten and Linear, the decoder's
        # Linear, ReLU and Unflatten): 1x1 convolutions join the grid to the code positions instead.
        channels = cell.channels[-1]
        down = nn.Sequential(*list(encoder)[:-2], nn.Conv2d(channels, dim, kernel_size=1), GridToCode())
        up = nn.Sequential(
            CodeToGrid(side, dim), nn.Conv2d(dim, channels, kernel_size=1), nn.ReLU(), *list(decoder)[3:]
        )
        return down, up

    def quantise(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output (N, latent_dim) with each position replaced by its nearest entry, and the entries'
        indices (N, positions)."""
        vectors = z_e.reshape(-1, self.settings.embedding_dim)
        entries = nearest_entries(vectors, self.codebook)
        return self.codebook[entries].view_as(z_e), entries.view(len(z_e), -1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantise(self.encoder(x))[0]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        z_e = self.encoder(x)
        quantised, _ = self.quantise(z_e)
        z = z_e + (quantised - z_e).detach()  # the entries forward, the identity backward (straight-through)
        return ModelOutput(logits=self.decode(z), code=quantised, z=z)

    def terms(self, x: torch.Tensor, z_e: torch.Tensor, quantised: torch.Tensor) -> dict[str, torch.Tensor]:
        recon = self.reconstruction(self.decode(z_e + (quantised - z_e).detach()), x)
        commitment = (z_e - quantised.detach()).pow(2).sum(1)
        return {"recon": recon, "commitment": commitment, "loss": recon + self.settings.commitment * commitment}

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z_e = self.encoder(x)
        return self.terms(x, z_e, self.quantise(z_e)[0])

    def train_step(self, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """A gradient step on the networks, then the codebook's moving averages toward the batch's assignments."""
        z_e = self.encoder(x)
        if not self.known_initialised:
            if not self.initialised:
                self.initialise_codebook(z_e.detach().reshape(-1, self.settings.embedding_dim))
            self.known_initialised = True
        quantised, entries = self.quantise(z_e)
        terms = self.terms(x, z_e, quantised)
        descend(optimizer, terms["loss"].mean())
        self.update_codebook(z_e.detach().reshape(-1, self.settings.embedding_dim), entries.flatten())
        return terms

    @torch.no_grad()
    def initialise_codebook(self, vectors: torch.Tensor) -> None:
        """Entries drawn from the first batch's encoder outputs (with replacement only when the batch has fewer
        vectors than entries), so that every entry starts where the encoder puts its codes."""
        size = len(self.codebook)
        picked = torch.randperm(len(vectors), device=vectors.device)[:size]
        if len(picked) < size:
            picked = torch.cat([picked, torch.randint(len(vectors), (size - len(picked),), device=vectors.device)])
        self.codebook.copy_(vectors[picked])
        self.entry_sum.copy_(vectors[picked])
        self.initialised.fill_(True)

    @torch.no_grad()
    def update_codebook(self, vectors: torch.Tensor, entries: torch.Tensor) -> None:
        """N_k <- decay N_k + (1 - decay) n_k and m_k <- decay m_k + (1 - decay) sum of the vectors assigned to
        entry k; then e_k = m_k / N_k, with N_k Laplace-smoothed."""
        decay = self.settings.decay
        one_hot = torch.zeros(len(entries), len(self.codebook), device=vectors.device)
        one_hot[torch.arange(len(entries), device=vectors.device), entries] = 1.0
        self.cluster_size.mul_(decay).add_(one_hot.sum(0), alpha=1 - decay)
        self.entry_sum.mul_(decay).add_(one_hot.T @ vectors, alpha=1 - decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + SMOOTHING) / (total + len(self.codebook) * SMOOTHING) * total
        self.codebook.copy_(self.entry_sum / smoothed.unsqueeze(1))

    def latent_from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.sampler.entries(noise)].flatten(1)

    @torch.no_grad()
    def fit_sampler(self, codes: torch.Tensor) -> None:
        """The categoricals of the entries the training codes (already entries) are made of."""
        self.sampler.fit(self.quantise(codes)[1])

    @torch.no_grad()
    def own_metrics(self, images: torch.Tensor) -> dict[str, float]:
        self.eval()
        counts = torch.zeros(len(self.codebook), device=images.device)
        for batch in images.split(1000):
            entries = self.quantise(self.encoder(batch))[1].flatten()
            counts += torch.bincount(entries, minlength=len(self.codebook)).to(counts.dtype)
        return {"codebook_perplexity": perplexity(counts), "dead_codes": (counts == 0).float().mean().item()}
