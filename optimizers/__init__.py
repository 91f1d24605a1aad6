"""Optimizers built on hvp's curvature products."""
