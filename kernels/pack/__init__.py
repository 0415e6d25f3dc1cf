"""Memory layouts: how values are arranged for the kernels, with no arithmetic."""
