"""IHE-RO profile editions and DICOM tables, kept as YAML data.

This is a package only so that the YAML files ship as package data and a
non-editable install finds them through importlib.resources.
"""
