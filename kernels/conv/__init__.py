"""Quantized 2-D convolutions and pooling over NHWC activations (see each module's contract)."""
