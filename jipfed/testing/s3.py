"""Re-export of :mod:`jipfed.local.s3` (moto's S3 server launcher moved there) for the tests."""

from jipfed.local.s3 import LocalS3Server, LocalS3ServerError

S3TestServer = LocalS3Server
S3TestServerError = LocalS3ServerError
