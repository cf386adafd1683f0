"""Drop-ins for other libraries (diffusers). Imported lazily: diffusers is optional."""
