"""The ``lowbit demo``: train small digit classifiers in NumPy, quantize them, and compare accuracy, size and speed."""
