"""The style adapter library: storage on disk, file formats, and blending at generation time."""
