"""Imaging: synthetic data, PACS access (DICOMweb, DIMSE), DICOM→NIfTI conversion, preprocessing."""
