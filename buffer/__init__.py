"""The SQLite store-and-forward queue on the device."""
