"""The try-it web UI: a Gradio app over the same service and video backend as the HTTP APIs."""
