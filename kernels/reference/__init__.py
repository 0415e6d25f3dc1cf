"""Plain NumPy definitions of what every kernel computes: the oracles tests compare against.

Nothing here is fast. Integer results are exact (int64 arithmetic); float steps
follow the same formulas, in the same order, as the kernels, so integer outputs
must equal these bit for bit. One module per weight format.
"""

from kernels.reference.int8 import gemm_int8_ref, linear_int8_ref

__all__ = ["gemm_int8_ref", "linear_int8_ref"]
