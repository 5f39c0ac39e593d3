"""The models the project trains, one folder each, and the registry that names them."""
