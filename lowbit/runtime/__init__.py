"""Executing layer graphs: each node prepared once into a :class:`~lowbit.runtime.registry.Kernel`, then run many times."""
