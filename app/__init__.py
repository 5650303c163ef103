"""Style Studio's web UI (Gradio). No torch code here: it calls `trainer` and `styles`."""
