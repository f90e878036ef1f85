"""Pure numpy linear algebra on low-rank factors: exact SVD, rank allocation, fits.

Nothing here reads or writes files; everything works from factors and never forms an
out×in matrix unless a docstring says so.
"""
