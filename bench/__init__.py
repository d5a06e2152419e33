"""The benchmark (``./scripts/bench``, see ``bench/__main__.py``) and the chaos soak (``bench/soak.py``)."""
