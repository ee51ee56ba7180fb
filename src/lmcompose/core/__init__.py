"""The bottom layer: errors, float dtypes, input statistics, linear-algebra helpers, atomic writes and
memory readings. It imports nothing else from lmcompose, so every other layer can use it."""
