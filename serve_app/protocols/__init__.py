"""The front doors: one module per provider (Oxen, Segmind, Roboflow, HF Space) and the native API, each a translator."""
