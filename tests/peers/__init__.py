"""Independent DICOM peers for the UPS (Unified Procedure Step) test suite.

These peers were written from the text of DICOM PS3.4 Annex CC (Unified Worklist and
Procedure Step Service Class), PS3.7 (status codes) and the conventions of public
implementations (sjswerdloff/tdwii_plus_examples, dcm4che/dcm4che, dcm4che/dcm4chee-arc-light,
microsoft/dicom-server), so that the product is no longer tested only against its own twins.

* :mod:`.ups_uids`       - SOP Class UIDs (final and frozen-draft "trial" sets), type IDs.
* :mod:`.ups_rules`      - the standard's tables as data (Table CC.1.1-2, Table CC.2.3-2,
  Table CC.2.5-3 subsets) and C-FIND matching (PS3.4 C.2.2.2).
* :mod:`.ups_scu`        - a UPS SCU, as a TMS client or a treatment device would use it.
* :mod:`.event_receiver` - a UPS Event receiver (N-EVENT-REPORT), like tdwii's upseventreceiver.
* :mod:`.ups_scp`        - a strict, small UPS SCP ("a TMS written from PS3.4"): the network
  side, the CC.3.1 checks and the request/violation logs. Its worklist is :mod:`.ups_model`,
  its UPS Event SCU :mod:`.event_sender`, its Storage and Study Root C-MOVE SCP
  :mod:`.object_store`.

Rule: nothing here imports the product (``emulator``, ``devices``, ``profiles``, ``hil``) or
any other test module. Only the Python standard library, pydicom and pynetdicom are allowed;
``tests/test_peer_selfcheck.py`` enforces this with :mod:`ast`.
"""
