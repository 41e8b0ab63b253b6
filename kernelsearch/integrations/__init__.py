"""Bridges to other libraries: ``integrations.transformers`` (Hugging Face models)."""
