"""Bench rig: the controller simulator, its fault injection and the wire protocol docs."""
