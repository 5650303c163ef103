"""The training engine: ingest images, load a base model, train a LoRA style adapter.

Submodules are imported where needed so that torch-free parts (config, events) stay light.
"""
