"""The torch-free bottom layer: style names, whole-or-nothing file writes, the safetensors header reader,
how many CPU threads torch gets.

Everything above may import it (`styles`, `trainer`, `app`); it imports nothing of the project.
"""
