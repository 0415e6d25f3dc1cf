"""Executing layer graphs: each node prepared once into a :class:`~lowbit.runtime.registry.Kernel`, then run many times."""

from lowbit.runtime.passes import fold_batch_norm, fuse_activations
from lowbit.runtime.profile import Profile, ProfileRow
from lowbit.runtime.registry import Kernel, preparer
from lowbit.runtime.session import Session

__all__ = ["Kernel", "Profile", "ProfileRow", "Session", "fold_batch_norm", "fuse_activations", "preparer"]
