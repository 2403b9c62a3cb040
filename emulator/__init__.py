"""tdw-emulator: IHE-RO Treatment Delivery Workflow devices, reference TMS and Archive."""

__version__ = "0.1.0"
