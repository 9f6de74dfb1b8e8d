"""The image pipeline: model loading, the engine (encode/decode), prompts, post-processing, mask codecs, image I/O."""
