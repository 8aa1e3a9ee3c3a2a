"""Loss terms as pure functions of tensors (terms) and a stage's weighted dict of them (objective)."""
