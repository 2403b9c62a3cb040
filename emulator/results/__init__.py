"""Builders of the objects a performing device stores: treatment records and more."""
