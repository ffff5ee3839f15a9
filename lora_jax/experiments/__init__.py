"""Experiment support: offline datasets (:mod:`lora_jax.experiments.data`)."""
