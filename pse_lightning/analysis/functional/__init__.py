"""Pure tensor cores of the analyses: tensors in, tensors out, no state, no Lightning."""
