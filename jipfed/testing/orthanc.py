"""Re-export of :mod:`jipfed.local.orthanc` (the Orthanc launcher moved there) for the tests."""

from jipfed.local.orthanc import OrthancError, OrthancServer  # noqa: F401
from jipfed.local.ports import free_port  # noqa: F401
