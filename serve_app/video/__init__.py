"""Video support: decoding hostile uploads within limits, rendering masks into MP4, encoding masks as RLE."""
