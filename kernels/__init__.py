"""lowbit's kernel layer: Numba-compiled low-bit CPU kernels, arrays in and arrays out.

Depends on numpy, numba and llvmlite only, and never on ``lowbit``. Importing it
compiles nothing; each kernel compiles (or loads from Numba's on-disk cache) on
first use, for the instruction-set level ``kernels.cpu.active_level()`` allows.
"""

from __future__ import annotations

import numba
import numpy as np

from kernels import cpu
from kernels.attention import AttentionPlan, attention, attention_plan
from kernels.conv.binary import conv2d_binary
from kernels.conv.float32 import Conv2dFloat32Plan, conv2d_float32, conv2d_float32_plan
from kernels.conv.int4 import PackedConvInt4, conv2d_int4, pack_conv_int4
from kernels.conv.int8 import (ConvPlan, PackedConvInt8, conv2d_int8, conv2d_int8_plan, pack_conv_int8,
                               qlinear_conv2d, qlinear_conv2d_plan)
from kernels.conv.layout import nchw_to_nhwc, nchw_to_nhwc_plan, nhwc_to_nchw, nhwc_to_nchw_plan
from kernels.conv.pool import (avg_pool2d, avg_pool2d_float32, avg_pool2d_float32_plan, global_avg_pool2d,
                               global_avg_pool2d_plan, max_pool2d, max_pool2d_bits, max_pool2d_plan)
from kernels.elementwise import (lookup_table, qlinear_add, qlinear_add_plan, qlinear_lookup, qlinear_mul,
                                 qlinear_mul_plan)
from kernels.gemm.binary import gemm_binary, gemm_binary_int8, gemm_binary_plan, gemm_binary_to_bits
from kernels.gemm.codebook import gemm_codebook, gemm_codebook_plan
from kernels.gemm.dynamic import DynamicLinearPlan, linear_dynamic_int8, linear_dynamic_int8_plan
from kernels.gemm.float32 import LinearFloat32Plan, linear_float32_plan
from kernels.gemm.int4 import gemm_int4, gemm_int4_plan
from kernels.gemm.int8 import LinearPlan, gemm_int8, gemm_int8_plan, linear_int8, linear_int8_plan, max_k_int32
from kernels.gemm.ternary import gemm_ternary, gemm_ternary_plan
from kernels.layer_norm import LayerNormPlan, layer_norm, layer_norm_plan
from kernels.pack.bits import pack_bits, unpack_bits
from kernels.quantize import (dequantize_linear, dequantize_linear_plan, dynamic_quantize_linear, quantize_linear,
                              quantize_linear_plan,
                              quantize_linear_to_nhwc, quantize_linear_to_nhwc_plan)
from kernels.pack.conv_binary import PackedConvBinary, pack_conv_binary
from kernels.pack.codebook import PackedCodebook, pack_codebook, pack_codebook_weights
from kernels.pack.int4 import PackedInt4, pack_int4, pack_int4_codes
from kernels.pack.panels import PackedInt8, pack_int8
from kernels.pack.ternary import PackedTernary, pack_ternary, pack_ternary_codes
from kernels.softmax import SoftmaxPlan, softmax, softmax_plan
from kernels.threads import get_num_threads, set_num_threads

__all__ = [
    "AttentionPlan",
    "Conv2dFloat32Plan",
    "ConvPlan",
    "DynamicLinearPlan",
    "LayerNormPlan",
    "LinearFloat32Plan",
    "LinearPlan",
    "PackedCodebook",
    "PackedConvBinary",
    "PackedConvInt4",
    "PackedConvInt8",
    "PackedInt4",
    "PackedInt8",
    "PackedTernary",
    "SoftmaxPlan",
    "attention",
    "attention_plan",
    "avg_pool2d",
    "avg_pool2d_float32",
    "avg_pool2d_float32_plan",
    "conv2d_binary",
    "conv2d_float32",
    "conv2d_float32_plan",
    "conv2d_int4",
    "conv2d_int8",
    "conv2d_int8_plan",
    "cpu_info",
    "dequantize_linear",
    "dequantize_linear_plan",
    "dynamic_quantize_linear",
    "gemm_binary",
    "gemm_binary_int8",
    "gemm_binary_plan",
    "gemm_binary_to_bits",
    "gemm_codebook",
    "gemm_codebook_plan",
    "gemm_int4",
    "gemm_int4_plan",
    "gemm_int8",
    "gemm_int8_plan",
    "gemm_ternary",
    "gemm_ternary_plan",
    "get_num_threads",
    "global_avg_pool2d",
    "global_avg_pool2d_plan",
    "layer_norm",
    "layer_norm_plan",
    "linear_dynamic_int8",
    "linear_dynamic_int8_plan",
    "linear_float32_plan",
    "linear_int8",
    "linear_int8_plan",
    "lookup_table",
    "max_k_int32",
    "max_pool2d",
    "max_pool2d_bits",
    "max_pool2d_plan",
    "nchw_to_nhwc",
    "nchw_to_nhwc_plan",
    "nhwc_to_nchw",
    "nhwc_to_nchw_plan",
    "pack_bits",
    "pack_codebook",
    "pack_codebook_weights",
    "pack_conv_binary",
    "pack_conv_int4",
    "pack_conv_int8",
    "pack_int4",
    "pack_int4_codes",
    "pack_int8",
    "pack_ternary",
    "pack_ternary_codes",
    "qlinear_add",
    "qlinear_add_plan",
    "qlinear_conv2d",
    "qlinear_conv2d_plan",
    "qlinear_lookup",
    "qlinear_mul",
    "qlinear_mul_plan",
    "quantize_linear",
    "quantize_linear_plan",
    "quantize_linear_to_nhwc",
    "quantize_linear_to_nhwc_plan",
    "set_num_threads",
    "softmax",
    "softmax_plan",
    "unpack_bits",
]


def cpu_info() -> dict:
    """What the kernels see and will use on this machine.

    Keys: ``cpu`` (model name), ``arch``, ``features`` (the relevant ones present),
    ``supported_levels``, ``host_level``, ``active_level`` (after ``LOWBIT_ISA``),
    ``threads``, and the ``numba``, ``llvmlite``, ``llvm`` and ``numpy`` versions.
    """
    import llvmlite
    import llvmlite.binding as llvm

    have = cpu.target_features()
    return {
        "cpu": cpu.cpu_name(),
        "arch": cpu.host_arch(),
        "features": [f for f in cpu.RELEVANT_FEATURES if f in have],
        "supported_levels": [lv.name for lv in cpu.supported_levels()],
        "host_level": cpu.host_level().name,
        "active_level": cpu.active_level().name,
        "threads": get_num_threads(),
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "llvm": ".".join(map(str, llvm.llvm_version_info)),
        "numpy": np.__version__,
    }
