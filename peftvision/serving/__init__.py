"""Serving: many adapters over one frozen backbone (`multi.py`) and the HTTP server over it (`http.py`)."""
