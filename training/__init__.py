"""Training entry points, data, checkpointing and evaluation (installed as ``adatok_vlm.training``)."""
