"""DICOM plumbing shared by every actor: AE factory, peers, and SCU helpers."""
