"""The warehouse: one DuckDB file, the single source of truth and provenance record."""
