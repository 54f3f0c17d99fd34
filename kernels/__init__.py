"""fastmargin's Triton kernels, installed as fastmargin.kernels (docs/design.md §5).

One kernel and its launcher a file; autograd and dispatch live in fastmargin/.
"""
