"""The student: a text encoder with mean pooling and FC heads, optionally a vision tower whose
tokens pass a projection pool into the text encoder. Models turn inputs into tensors, nothing else."""
