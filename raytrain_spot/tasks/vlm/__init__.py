"""The built-in vision-language task: a small VLM on generated shapes or your Parquet shards."""
