"""Checkpoints: the orbax manager (train state + data-iterator state) and Hugging Face interop."""
