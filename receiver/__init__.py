"""Central ingest and the DataLab store."""
