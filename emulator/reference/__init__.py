"""Reference counterparts of the performing devices: the Archive (and, later, the TMS)."""
