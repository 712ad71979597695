"""Scenes to scores: batteries, the five measures with intervals, exact tests and bootstraps (no torch)."""
