"""Deployment: loading a trained run for inference (export and serving build on this)."""
