"""Framework backends of the Mistral spec; each is imported only when chosen."""
