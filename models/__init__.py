"""Base models: load one (embedded default, hub id, diffusers folder, single file) as a Base that knows its facts.

Below `styles/` and `trainer/`, which both use it; it imports neither.
"""
