"""Models: loading pipelines, the offline demo model, tiny test models, benchmark architectures."""
