"""Object storage behind a URI: local files and Google Cloud Storage."""
