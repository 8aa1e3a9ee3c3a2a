"""Teachers and the target cache: every teacher encodes a corpus once, to disk, before training."""
