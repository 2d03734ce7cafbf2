"""jaxpp/models."""
