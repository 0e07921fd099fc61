"""Identity mining: person clusters from face embeddings, cross-identity pairs, reports."""
