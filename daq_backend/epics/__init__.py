"""EPICS buffer (PVs -> Redis streams with a pulse-id -> time map) and EPICS writer (-> HDF5).

Modules: ``records`` (stream format), ``store`` (Redis or embedded), ``sink`` (outage-tolerant
stream appends), ``buffer`` (caproto monitors, ``std-daq epics-buffer``), ``writer`` (request ->
HDF5), ``service`` (the writer on the broker, ``std-daq epics-writer``), ``stats`` (InfluxDB line
protocol), ``sim_ioc`` (caproto simulated IOC). Nothing is imported here, so each module runs
cleanly with ``python -m``.
"""
