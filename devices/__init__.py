"""Device abstraction layer: the abstract Device, its backends and simulated machines.

Filled by issue [4/7]; it never imports ``emulator`` (see shared/architecture.md).
"""
