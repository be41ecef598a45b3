"""Thin Hydra apps over actcomp: memory, speed, fit, train, figures, reproduce."""
