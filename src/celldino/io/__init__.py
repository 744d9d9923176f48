"""All file access: images, tables, zarr stores, checkpoints. The only package that touches files."""
