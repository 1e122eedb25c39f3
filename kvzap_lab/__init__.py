"""kvzap-lab: a research lab for learned KV-cache eviction (KVzap scorers, KVzip+ oracle, real eviction)."""

__version__ = "0.1.0"
