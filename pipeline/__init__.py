"""Mining stages as plain functions: numpy / torch / polars in, files out. No Dagster imports here."""
