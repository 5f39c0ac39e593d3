"""The data side: MVTec AD folders, images as the model reads them, and the built-in demo data (no torch)."""
