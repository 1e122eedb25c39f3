"""Gymnasium environments over the real decode loop."""
