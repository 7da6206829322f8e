import json
import math
from datetime import datetime, timedelta

import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.training.logger import DLLogger, read_log, reference_metadata

START = datetime(2024, 3, 1, 12, 0, 0)


def _clock(*offsets_s):
    """A fake ``datetime.now``: START at creation, then START + each offset in turn."""
    times = iter([START] + [START + timedelta(seconds=s) for s in offsets_s])
    return lambda: next(times)


def _raw_lines(path):
    return path.read_text().splitlines()


def test_json_lines_are_dllogger_json_stream_lines_byte_for_byte(tmp_path):
    path = tmp_path / "log.json"
    with DLLogger(path, stdout=False, now=_clock(0.25, 1.5, 3)) as logger:
        logger.metadata("latency_p90", {"unit": "ms"})
        logger.log(step=(0, 1), data={"total_loss": 0.5, "samples/s": 1000.0})
        logger.log(step=(), data={"time_to_train": 12.0})

    t1, t2, t3 = (START + timedelta(seconds=s) for s in (0.25, 1.5, 3))
    assert _raw_lines(path) == [
        'DLLL {"timestamp": "%s", "elapsedtime": "0.25", "datetime": "2024-03-01 12:00:00.250000", '
        '"type": "METADATA", "metric": "latency_p90", "metadata": {"unit": "ms"}}' % t1.timestamp(),
        'DLLL {"timestamp": "%s", "datetime": "2024-03-01 12:00:01.500000", "elapsedtime": "1.5", '
        '"type": "LOG", "step": [0, 1], "data": {"total_loss": 0.5, "samples/s": 1000.0}}'
        % t2.timestamp(),
        # str(datetime) drops the microseconds when they are 0, as in dllogger
        'DLLL {"timestamp": "%s", "datetime": "2024-03-01 12:00:03", "elapsedtime": "3.0", '
        '"type": "LOG", "step": [], "data": {"time_to_train": 12.0}}' % t3.timestamp(),
    ]


def test_parsed_events_have_dllogger_key_order_and_types(tmp_path):
    path = tmp_path / "log.json"
    with DLLogger(path, stdout=False) as logger:
        reference_metadata(logger)
        logger.log(step=(2, 7), data={"total_loss": 0.25})
        logger.log(step=[2], data={"test_auc": 0.75})
        logger.log(step=(), data={"throughput": 10.0})
    events = read_log(path)
    metadata, logs = events[:5], events[5:]
    for event in metadata:
        assert list(event) == ["timestamp", "elapsedtime", "datetime", "type", "metric", "metadata"]
        assert event["type"] == "METADATA"
    for event in logs:
        assert list(event) == ["timestamp", "datetime", "elapsedtime", "type", "step", "data"]
        assert event["type"] == "LOG"
    for event in events:
        assert isinstance(event["timestamp"], str) and float(event["timestamp"]) > 1e9
        assert isinstance(event["elapsedtime"], str) and float(event["elapsedtime"]) >= 0
        datetime.fromisoformat(event["datetime"])
        assert float(event["timestamp"]) == pytest.approx(
            datetime.fromisoformat(event["datetime"]).timestamp(), abs=1e-6)
    assert [event["step"] for event in logs] == [[2, 7], [2], []]
    assert [event["data"] for event in logs] == [
        {"total_loss": 0.25}, {"test_auc": 0.75}, {"throughput": 10.0}]


def test_reference_metadata_is_main_py_init_logger(tmp_path):
    path = tmp_path / "log.json"
    with DLLogger(path, stdout=False) as logger:
        reference_metadata(logger)
    assert [(event["metric"], event["metadata"]) for event in read_log(path)] == [
        ("test_auc", {"unit": None}),
        ("latency_p90", {"unit": "ms"}),
        ("train_loss", {"unit": None}),
        ("time_to_train", {"unit": "s"}),
        ("throughput", {"unit": "samples/s"}),
    ]
    assert '"metadata": {"unit": null}' in _raw_lines(path)[0]


def test_stdout_lines_are_dllogger_std_out_backend_lines(tmp_path, capsys):
    with DLLogger(tmp_path / "log.json", now=_clock(*range(1, 20))) as logger:
        reference_metadata(logger)
        logger.metadata("total_loss", {"format": ":.3f"})
        assert capsys.readouterr().out == ""  # metadata is not printed
        logger.log(step=(0, 1), data={"total_loss": 0.123456, "samples/s": 1000.0})
        logger.log(step=[0], data={"latency_p90": 12.5, "test_auc": 0.8, "train_loss": None})
        logger.log(step=(), data={"time_to_train": 3.5, "throughput": 7})
    assert capsys.readouterr().out.splitlines(keepends=True) == [
        "DLL 2024-03-01 12:00:07 - (0, 1) total_loss : 0.123  samples/s : 1000.0 \n",
        "DLL 2024-03-01 12:00:08 - (0,) latency_p90 : 12.5 ms test_auc : 0.8 None"
        " train_loss : None None\n",
        "DLL 2024-03-01 12:00:09 - () time_to_train : 3.5 s throughput : 7 samples/s\n",
    ]


def test_disabled_logger_is_a_no_op(tmp_path, capsys):
    path = tmp_path / "rank1" / "log.json"
    with DLLogger(path, enabled=False) as logger:
        reference_metadata(logger)
        logger.log(step=(0, 0), data={"total_loss": 1.0})
        logger.flush()
    logger.log(step=(), data={"x": 1.0})  # even after close
    assert not path.parent.exists()
    assert capsys.readouterr().out == ""


def test_numpy_and_tensorflow_values_become_python_numbers(tmp_path, capsys):
    path = tmp_path / "log.json"
    with DLLogger(path) as logger:
        logger.log(step=(np.int64(1), 2), data={
            "float32": np.float32(0.5), "float64": np.float64(0.25), "int64": np.int64(3),
            "bool": np.bool_(True), "array0d": np.array(1.5), "tensor": tf.constant(2.0),
            "int_tensor": tf.constant(4, tf.int64), "variable": tf.Variable(0.75),
            "plain": 1.0, "text": "ok",
        })
    event = read_log(path)[0]
    assert event["step"] == [1, 2]
    assert event["data"] == {"float32": 0.5, "float64": 0.25, "int64": 3, "bool": True,
                             "array0d": 1.5, "tensor": 2.0, "int_tensor": 4, "variable": 0.75,
                             "plain": 1.0, "text": "ok"}
    assert type(event["data"]["int64"]) is int and type(event["data"]["bool"]) is bool
    assert capsys.readouterr().out.endswith(
        "- (1, 2) float32 : 0.5  float64 : 0.25  int64 : 3  bool : True  array0d : 1.5  "
        "tensor : 2.0  int_tensor : 4  variable : 0.75  plain : 1.0  text : ok \n")


def test_nan_is_written_as_json_dumps_writes_it(tmp_path):
    path = tmp_path / "log.json"
    with DLLogger(path, stdout=False) as logger:
        logger.log(step=(0,), data={"test_auc": float("nan"), "loss": np.float32("nan")})
    assert '"data": {"test_auc": NaN, "loss": NaN}' in _raw_lines(path)[0]
    data = read_log(path)[0]["data"]
    assert math.isnan(data["test_auc"]) and math.isnan(data["loss"])


def test_epoch_lines_and_metadata_reach_the_file_before_close(tmp_path):
    path = tmp_path / "log.json"
    logger = DLLogger(path, stdout=False)
    logger.metadata("throughput", {"unit": "samples/s"})
    assert [event["type"] for event in read_log(path)] == ["METADATA"]
    logger.log(step=(0, 0), data={"total_loss": 1.0})
    logger.log(step=(0,), data={"throughput": 5.0})
    assert [event["step"] for event in read_log(path)[1:]] == [[0, 0], [0]]
    logger.log(step=(1, 0), data={"total_loss": 0.5})
    logger.log(step=(), data={"time_to_train": 2.0})
    assert [event["step"] for event in read_log(path)[1:]] == [[0, 0], [0], [1, 0], []]
    logger.close()
    logger.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        logger.log(step=(), data={})


def test_paths_append_and_stdout_only(tmp_path, capsys):
    path = tmp_path / "results" / "nested" / "log.json"  # parent directories are created
    with DLLogger(str(path), stdout=False) as logger:
        logger.log(step=(0,), data={"a": 1})
    with DLLogger(path, stdout=False, append=True) as logger:
        logger.log(step=(1,), data={"a": 2})
    assert [event["data"]["a"] for event in read_log(path)] == [1, 2]
    with DLLogger(path, stdout=False) as logger:  # truncates by default
        logger.log(step=(2,), data={"a": 3})
    assert [event["data"]["a"] for event in read_log(path)] == [3]

    capsys.readouterr()
    with DLLogger(None) as logger:
        logger.metadata("a", {"unit": "s"})
        logger.log(step=(), data={"a": 4})
    assert capsys.readouterr().out.endswith(" - () a : 4 s\n")


def test_read_log_skips_other_lines(tmp_path):
    path = tmp_path / "mixed.log"
    event = {"timestamp": "1.0", "datetime": "x", "elapsedtime": "0.0", "type": "LOG",
             "step": [], "data": {"a": 1}}
    path.write_text("some warning\nDLL 2024 - () a : 1 \nDLLL " + json.dumps(event) + "\n\n")
    assert read_log(path) == [event]
