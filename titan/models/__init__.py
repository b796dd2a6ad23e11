"""Model families titan trains."""
