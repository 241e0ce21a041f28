"""Device drivers, one module per device family.

Every driver takes its transport as an argument (a serial port object from
``serial_for_url``, an ``I2CBus``, a gpiozero pin factory, a clock) so that the
same code runs on a Pi and in the tests. Decoders are pure functions: bytes in,
typed records out, no I/O inside.
"""
