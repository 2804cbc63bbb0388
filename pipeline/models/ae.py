"""`ae`: the plain autoencoder, a deterministic code trained on reconstruction alone (Bernoulli by
default; `likelihood: gaussian` is the squared error the course used, up to scale and a constant).
Everything it does is the contract's default behaviour."""

from __future__ import annotations

from pipeline.models.contract import DETERMINISTIC, Autoencoder


class AE(Autoencoder):
    family = "ae"
    capabilities = DETERMINISTIC
