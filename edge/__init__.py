"""The device agent: configuration, clock, sampling loop and the technician's CLI."""
