"""kvzap-lab: a research lab for learned KV-cache eviction (KVzap scorers, KVzip+ oracle, real eviction)."""

__version__ = "0.1.0"
from kvzap_lab import envs as _envs  # noqa: E402,F401  registers the Gymnasium env ids (gymnasium registry only; no torch)
