"""Bundled demo preference data (see make_demo.py)."""
