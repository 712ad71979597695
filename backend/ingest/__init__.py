"""Corpora in: files of every kind read as text (streamed), corpus sets, tokens packed into blocks."""
