"""mtd: multi-teacher, multimodal knowledge distillation of embedding models.

The data flow, one sub-package per step (each imports only from the ones above it):

    errors, io, config, compat   shared ground: error base, atomic files, typed config
    data/        corpus texts, image-caption sets, batch order
    targets/     teachers and their on-disk vector cache (the multi-teacher target)
    models/      the student: text encoder, vision towers, projection pool, heads
    losses/      loss terms as pure functions, and a stage's weighted objective
    export       sentence-transformers export and loading (text and image sides)
    evaluation/  STS, retrieval, image-text, speed, hub sets, model specs, the end-of-run report
    training/    the Accelerate loop, stages, and a whole run (train.py's `run`)
"""

from mtd.compat import patch_torchvision

patch_torchvision()  # before anything imports torchvision (timm, open_clip, transformers)
