"""Inputs of training: corpus texts and their batch order, image-caption sets and image decoding."""
