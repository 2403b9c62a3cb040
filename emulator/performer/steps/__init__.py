"""The step kinds a performing device is composed of (see base.py)."""
