"""Headless core of ltm-tui: corpora, models, training, evaluation, the store and the jobs.

Nothing in this package imports textual; a subprocess test enforces it.
"""
