"""A third model, as a new contributor would add one: this folder and one registry line (test_model_interface)."""
