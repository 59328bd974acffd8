"""The /image endpoint: parameters, the serve pipeline, and the blueprint."""
