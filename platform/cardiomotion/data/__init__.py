"""Reading 4DCT (NIfTI, DICOM, phantom), ES/ED phases, preparation, the phantom cohort."""
from __future__ import annotations

from .scan import Scan, ScanFormat, detect_format, read_scan, scan_id_of

__all__ = ["Scan", "ScanFormat", "detect_format", "read_scan", "scan_id_of"]
