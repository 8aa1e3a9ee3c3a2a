"""mtd: multi-teacher distillation of text embedding models."""
