"""Transforms: steps that change the basis the weights live in, leaving the dense model's function unchanged
(rotations of the residual stream), so that the compression steps after them find easier weights."""
