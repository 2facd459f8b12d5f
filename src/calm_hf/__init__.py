"""CalM for Hugging Face."""
