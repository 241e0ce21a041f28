"""The shared core at the bottom of the layers: what the van and the centre both speak.

It imports nothing of ours (tests/test_layering.py): the sample model, the one exception
tree, clocks and time sources, calibration records and their arithmetic, fault points and
the wire format. drivers, buffer, uplink, edge, receiver and simulator build on it.
"""
