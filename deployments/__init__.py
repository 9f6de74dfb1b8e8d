"""Ray Serve shells over serve_app classes: one module per deployment, shared handle adapters, and app.build_app."""
