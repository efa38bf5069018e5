"""Model store: object layout, local-folder and S3 (MinIO) backends, experiment state."""
