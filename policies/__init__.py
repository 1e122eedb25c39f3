"""Policies: one file per eviction policy, registered by name."""
