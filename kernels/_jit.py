"""The one place where Numba compilation options are chosen.

Every kernel is cached on disk (``cache=True``) and releases the GIL
(``nogil=True``) so that ``kernels.threads`` can run tiles on a Python thread
pool. ``fastmath`` stays off: the epilogues round to integers and must match
``kernels.reference`` bit for bit, which FMA contraction would break.
"""

from __future__ import annotations

import functools

import numba

kernel = functools.partial(numba.njit, cache=True, nogil=True)
