"""The book's own machinery, used by the chapters and not by the science: where a chapter
runs and what it
says of itself (:mod:`~peftlab.book.runtime`), the figure style
(:mod:`~peftlab.book.style`), citable figures (:mod:`~peftlab.book.plotting`), claims
checked against the papers (:mod:`~peftlab.book.claims`) and GPU measurements kept with
their provenance (:mod:`~peftlab.book.records`).

Needs the ``book`` extra (``pip install peftlab[book]``: matplotlib, PyYAML).
"""
