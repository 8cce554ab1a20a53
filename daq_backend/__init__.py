"""std-daq backend: readout, buffers, writers, broker, REST, control, EPICS."""
