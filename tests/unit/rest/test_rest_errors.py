"""The REST domain modules raise domain errors (no HTTP), and one table gives each its HTTP status.

In process, no server: the error table covers every error class, the facade's and config store's
failures come out as the matching class (with their extra fields), and the handler answers each in
its route family's shape (admin: HTTP 200 with ``{"status": "error"}``).
"""

from __future__ import annotations

import inspect
import json
import uuid

import pytest

from daq_backend.broker import EmbeddedBrokerHub, EmbeddedTransport
from daq_backend.rest import errors
from daq_backend.rest.backend import DaqBackend
from daq_backend.rest.config_store import ConfigStore
from daq_backend.rest.http_layer import STATUS_CODES, error_response, status_code
from daq_backend.rest.request_tracker import RequestTracker, refuse_if_busy
from daq_backend.testing import make_config

EXPECTED = {
    errors.Malformed: 400,
    errors.BadParameter: 400,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Busy: 409,
    errors.TooLarge: 413,
    errors.Invalid: 422,
    errors.Refused: 502,
    errors.Unavailable: 503,
    errors.TimedOut: 504,
    errors.DaqError: 500,
}


def test_every_domain_error_has_its_status() -> None:
    classes = {c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.DaqError)}
    assert classes == set(EXPECTED)  # a new error class gets a row here and in STATUS_CODES
    for cls, code in EXPECTED.items():
        assert status_code(cls("x")) == code, cls
    assert set(STATUS_CODES) <= classes


def test_answer_shapes_by_family() -> None:
    api = error_response("/write_async", 409, "busy", running_request_id="r1", request_id=None)
    assert api.status_code == 409
    assert json.loads(bytes(api.body)) == {"detail": "busy", "running_request_id": "r1"}
    detector = error_response("/detector/x", 400, "Parameter not valid: FOO")
    assert detector.status_code == 400
    assert json.loads(bytes(detector.body)) == {"detail": "Parameter not valid: FOO",
                                                "response": "Parameter not valid: FOO"}
    admin = error_response("/daq/config", 422, "unknown config field(s): nope")
    assert admin.status_code == 200
    assert json.loads(bytes(admin.body)) == {"status": "error", "message": "unknown config field(s): nope"}


def test_config_store_raises_domain_errors() -> None:
    config = make_config("jungfrau")
    store = ConfigStore(config)
    with pytest.raises(errors.Invalid, match="unknown config field"):
        store.merged({"no_such_field": 1})
    with pytest.raises(errors.Invalid, match="must be a JSON object"):
        store.merged([1])
    with pytest.raises(errors.Invalid, match="detector_name cannot change"):
        store.merged({"detector_name": "other"})
    with pytest.raises(errors.Invalid, match="256x1024"):  # the Era B name stands for image_pixel_height
        store.merged({"image_height": 256})
    assert store.merged({"image_width": None}) == config  # null keeps the value
    with pytest.raises(errors.Conflict, match="config not applied"):
        store.update({"module_sync_timeout": 9.0})
    assert store.config == config and store.update({}) == config  # unchanged: nothing to apply


def test_busy_names_the_running_request() -> None:
    tracker = RequestTracker()
    refuse_if_busy(tracker, 60.0)  # nothing runs: no error
    tracker.register("first", {"n_images": 3, "output_file": "/data/a.h5"})
    with pytest.raises(errors.Busy) as refused:
        refuse_if_busy(tracker, 60.0)
    assert refused.value.extra == {"running_request_id": "first"}
    assert "first" in refused.value.message and "/data/a.h5" in refused.value.message


def test_facade_errors_carry_their_fields() -> None:
    hub = EmbeddedBrokerHub(f"re-{uuid.uuid4().hex[:10]}")
    hub.start()
    try:
        config = make_config("jungfrau")
        with DaqBackend(config, EmbeddedTransport(hub.name), output_roots=["/tmp"], owns_transport=True) as b:
            with pytest.raises(errors.NotFound, match="unknown request_id"):
                b.record("nope")
            with pytest.raises(errors.NotFound, match="unknown detector"):
                b.find_control("nope")
            with pytest.raises(errors.Forbidden, match="output_file"):
                b.validate_write({"n_images": 1, "output_file": "/etc/x.h5"})
            with pytest.raises(errors.NotFound, match="no preview source"):
                b.preview_png()
    finally:
        hub.stop()
