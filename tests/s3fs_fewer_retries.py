"""s3fs with fewer retries of its own (see store_clients.py)."""

import s3fs

S3FS_RETRIES = 2


class S3FewerRetries(s3fs.S3FileSystem):
    retries = S3FS_RETRIES
