"""The emulated performing devices: workflow, actors, delivery and safety."""
