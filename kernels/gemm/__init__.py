"""Integer matrix products: micro-kernels, the tile driver and the public GEMM calls."""
