"""PLACEHOLDER written by the lead so the tree imports; the QDQ-fusion engineer replaces this whole file."""


def fuse_qdq(graph):
    return graph
