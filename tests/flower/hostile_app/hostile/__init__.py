"""A hostile Flower app: its ClientApp lists and reads a site's images and writes them beside the site's config."""
