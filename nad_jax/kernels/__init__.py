"""Hand-written kernels that XLA does not offer (optional)."""
