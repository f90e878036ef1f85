"""Operations that compose the floors below: convert, rerank, audit, report, spectrum, importance files,
and ``open``/``save``. Each module is imported where it is used (this package imports nothing)."""
