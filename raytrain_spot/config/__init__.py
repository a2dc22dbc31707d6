"""Typed settings: the schema, the error every bad setting raises, override checks, secrets."""
