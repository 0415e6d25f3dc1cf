"""Benchmarks of lowbit's int8 GEMM against NumPy, ONNX Runtime and the VNNI peak (not installed)."""
