"""C-MOVE sub-operations that stream the stored file instead of re-encoding a dataset.

pynetdicom's Move SCP wants a Dataset per sub-operation and encodes it again, so every
object of a retrieval was read with dcmread and written back with pydicom: about 2 ms of
CPU per CT slice (py-spy on benchmarks/retrieve.py) for bytes the store already holds in a
transfer syntax the destination usually accepted. pynetdicom's ``send_c_store`` can stream
a Part 10 file from disk in PDU-sized chunks (``STORE_SEND_CHUNKED_DATASET``), but its
Move SCP only takes Datasets.

So a Move handler yields a :class:`StoredFileReference`: a Dataset that names the SOP
instance (pynetdicom's sub-operation counts and Failed SOP Instance UID List keep working)
and the file. The sub-association is made with :data:`SUB_ASSOCIATION_HANDLERS`, which wrap
its ``send_c_store`` when it is established to send the file the reference names. When the
destination accepted no context with the file's own transfer syntax, the file is read and
sent as a Dataset, which lets pynetdicom convert between the uncompressed syntaxes.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.association import Association

# Only affects send_c_store() given a path, which only this module does: the file's bytes
# go out as they are, in chunks, instead of through dcmread and an encode.
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


class StoredFileReference(Dataset):
    """A stored Part 10 file, standing in for its dataset in a Move handler's yields."""

    def __init__(self, path: Path, sop_class_uid: str, sop_instance_uid: str, syntax: str):
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        # Plain attributes (not DICOM keywords), so pynetdicom never encodes them.
        self.stored_path = Path(path)
        self.stored_transfer_syntax = syntax


def _accepts_as_stored(assoc: Association, reference: StoredFileReference) -> bool:
    return bool(reference.stored_transfer_syntax) and any(
        context.abstract_syntax == reference.SOPClassUID
        and context.transfer_syntax
        and context.transfer_syntax[0] == reference.stored_transfer_syntax
        for context in assoc.accepted_contexts
    )


def _send_stored_files(event: evt.Event) -> None:
    assoc = event.assoc
    send_c_store = assoc.send_c_store

    def send(dataset, *args, **kwargs):
        if isinstance(dataset, StoredFileReference):
            if _accepts_as_stored(assoc, dataset):
                return send_c_store(dataset.stored_path, *args, **kwargs)
            dataset = dcmread(dataset.stored_path)
        return send_c_store(dataset, *args, **kwargs)

    assoc.send_c_store = send


SUB_ASSOCIATION_HANDLERS = [(evt.EVT_ESTABLISHED, _send_stored_files)]
