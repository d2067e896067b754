"""Serving: the image pyfunc, its packaging, and the HTTP client of the serving contract."""
