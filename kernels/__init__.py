"""fastmargin's Triton kernels, installed as fastmargin.kernels (DESIGN §4).

One kernel and its launcher a file; autograd and dispatch live in fastmargin/.
"""
