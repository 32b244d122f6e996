"""Optional integrations with other libraries (installed only when those libraries are present)."""
