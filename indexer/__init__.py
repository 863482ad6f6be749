"""indexer: reads container images and writes their content and manifest into a store."""
