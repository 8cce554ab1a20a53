"""The std-daq detector as an ophyd-async device (``StandardDetector``), beside the ophyd v1 devices.

```python
from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider
from std_daq_ophyd.async_devices import StdDaqAsyncDetector

det = StdDaqAsyncDetector("http://daq-host:5000",
                          StaticPathProvider(UUIDFilenameProvider(), "/data/p12345/raw"), name="det")
```
"""

from std_daq_ophyd.async_devices.acquire_logic import StdDaqAcquireLogic
from std_daq_ophyd.async_devices.data_logic import StdDaqDataLogic
from std_daq_ophyd.async_devices.detector import StdDaqAsyncDetector
from std_daq_ophyd.async_devices.driver import StdDaqDriverIO
from std_daq_ophyd.async_devices.steps import AcquisitionStalled, AcquisitionStepError, AsyncTimeouts
from std_daq_ophyd.async_devices.trigger_logic import DEADTIME_S, TIMING_OF_TRIGGER, StdDaqTriggerLogic
from std_daq_ophyd.async_devices.writer_io import StdDaqWriterIO

__all__ = [
    "DEADTIME_S",
    "TIMING_OF_TRIGGER",
    "AcquisitionStalled",
    "AcquisitionStepError",
    "AsyncTimeouts",
    "StdDaqAcquireLogic",
    "StdDaqAsyncDetector",
    "StdDaqDataLogic",
    "StdDaqDriverIO",
    "StdDaqTriggerLogic",
    "StdDaqWriterIO",
]
