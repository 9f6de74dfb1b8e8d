"""Offline batch segmentation of image and video collections with Ray Data, on the online server's engine classes."""
