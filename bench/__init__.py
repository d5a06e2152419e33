"""The benchmark: tailgate against clients straight to the mock upstream and against the naive proxy.

Run it with ``./scripts/bench`` (``--quick`` for a smoke run); see ``bench/__main__.py``.
"""
