"""Optimizer math as pure functions over tensors; the optimizer classes only keep the books."""
