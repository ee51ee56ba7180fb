"""Training steps: continuous parameters of already compressed layers, trained against the dense model."""
