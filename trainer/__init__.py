"""The training engine: ingest images, train a LoRA style adapter (it hands the adapter back), run jobs.

trainer.config and trainer.events import no torch (tests/test_layers.py checks), so the UI and the CLI's
--help read them at once; the rest loads torch where it is imported.
"""
