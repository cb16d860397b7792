"""Generators over variable-length AdaTok tokens (installed as ``adatok_vlm.generator``)."""
