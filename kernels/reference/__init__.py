"""Plain NumPy definitions of what every kernel computes: the oracles tests compare against.

Nothing here is fast. Integer results are exact (int64 arithmetic); float steps
follow the same formulas, in the same order, as the kernels, so integer outputs
must equal these bit for bit. One module per weight format.
"""

from kernels.reference.binary import gemm_binary_int8_ref, gemm_binary_real_ref, gemm_binary_ref, gemm_binary_to_bits_ref
from kernels.reference.codebook import dequantize_codebook_ref, gemm_codebook_ref
from kernels.reference.int4 import dequantize_int4_ref, gemm_int4_ref, quantize_activations_ref
from kernels.reference.conv import conv2d_ref
from kernels.reference.elementwise import qlinear_add_ref, qlinear_lookup_ref, qlinear_mul_ref
from kernels.reference.int8 import finish_ref, gemm_int8_ref, linear_int8_ref
from kernels.reference.pool import avg_pool2d_ref, global_avg_pool2d_ref, max_pool2d_ref
from kernels.reference.ternary import gemm_ternary_ref

__all__ = ["avg_pool2d_ref", "conv2d_ref", "dequantize_codebook_ref", "finish_ref", "global_avg_pool2d_ref",
           "max_pool2d_ref", "dequantize_int4_ref", "gemm_binary_int8_ref", "gemm_binary_real_ref",
           "gemm_binary_ref", "gemm_binary_to_bits_ref", "gemm_codebook_ref", "gemm_int4_ref", "gemm_int8_ref",
           "gemm_ternary_ref", "linear_int8_ref", "qlinear_add_ref", "qlinear_lookup_ref", "qlinear_mul_ref",
           "quantize_activations_ref"]
