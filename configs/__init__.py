"""The project's config files as package data (``adatok_vlm.configs``): training YAML, DeepSpeed and
Accelerate configs, VAE architectures, a Slurm script. No code; ``training.config.configs_dir()`` finds
this folder in a regular install as in a source checkout."""
