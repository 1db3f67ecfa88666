"""Site data: manifests, the synthetic hospital generator, partitioning and loading."""
